"""Parallel-LoRA baselines of ``docs/methods.md`` §8: MoLoRA, MultiLoRA and LoRA-Split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtlora.adapters.registry import register
from mtlora.adapters.spec import Knob, MethodSpec, choice_knob, int_knob, num_knob, rank_multiple_of

SPLIT_ROUTINGS = ("task", "none")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _top_k_problem(v: Any, values: Mapping[str, Any]) -> str | None:
    n = values.get("num_experts")
    allowed = f"null (dense routing) or an integer in [1, adapter.num_experts={n}]"
    if v is None:
        return None
    if not (_is_int(v) and v >= 1) or (_is_int(n) and v > n):
        return allowed
    return None


def _split_of_task_problem(v: Any, values: Mapping[str, Any]) -> str | None:
    k = values.get("num_splits")
    allowed = f"null or a non-empty list of split indices in [0, {k}) (one per task)"
    if v is None:
        return None
    if isinstance(v, str | bytes) or not hasattr(v, "__len__") or len(v) == 0:
        return allowed
    if not all(_is_int(j) and j >= 0 and (not _is_int(k) or j < k) for j in v):
        return allowed
    return None


MOLORA = register(
    MethodSpec(
        name="molora",
        layer="mtlora.adapters.molora:MoLoraLinear",
        doc="MoLoRA: N full LoRA experts mixed per token by softmax(W_g x), optional top-k",
        knobs=(
            int_knob("num_experts", 4, "number N of experts (each of the full rank)"),
            Knob(
                "top_k",
                None,
                "keep the k largest router weights per token, renormalised; null: dense",
                check=_top_k_problem,
            ),
            num_knob(
                "balance_weight",
                0.0,
                "weight of the expert-usage balance loss cv²(p̄), mean over layers; 0: off",
            ),
        ),
        token_routed=True,
        rank_rule="per_head",
        heads_key="num_experts",
        router_params=("lora_router",),
    )
)

MULTILORA = register(
    MethodSpec(
        name="multilora",
        layer="mtlora.adapters.multilora:MultiLoraLinear",
        doc="MultiLoRA: n parallel LoRAs with learnable output scalings v_i",
        knobs=(int_knob("num_loras", 3, "number n of parallel LoRAs (each of rank `rank`)"),),
        rank_rule="per_head",
        heads_key="num_loras",
    )
)


def _split_packing(values: Mapping[str, Any]) -> str | None:
    if values.get("split_routing", "task") == "task":
        return (
            "adapter.method=lora_split with split_routing=task needs one task per row; set data.packing=false "
            "or adapter.split_routing=none"
        )
    return None


LORA_SPLIT = register(
    MethodSpec(
        name="lora_split",
        layer="mtlora.adapters.split:LoraSplitLinear",
        doc="LoRA-Split: k LoRAs of rank rank/k, each trained on its own task subset",
        knobs=(
            int_knob("num_splits", 4, "number k of splits (each of rank rank/k; must divide rank)"),
            choice_knob(
                "split_routing",
                "task",
                SPLIT_ROUTINGS,
                "task: in training a row uses its task's split only; none: every split always",
            ),
            Knob(
                "split_of_task",
                None,
                "entry t = split of task t; null: t mod num_splits",
                check=_split_of_task_problem,
            ),
        ),
        rules=(rank_multiple_of("num_splits", "split"),),
        task_ids="training",
        packing_conflict=_split_packing,
        heads_key="num_splits",
    )
)
