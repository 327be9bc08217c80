"""mtLoRA (Tian, Ledent, Sun; ICLR 2026; ``docs/methods.md`` §6): layers in :mod:`mtlora.adapters.mtlora`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtlora.adapters.methods.multihead import DROPOUT_PLACES, multihead_knobs
from mtlora.adapters.registry import register
from mtlora.adapters.spec import Knob, MethodSpec, bool_knob, choice_knob, int_knob, num_knob

PLACEMENTS = ("component", "block_ffn", "block_attn", "both")
BLOCK_STYLES = ("lowrank", "bottleneck", "adaptformer")
SPECTRAL_MODES = ("self_gram", "cross_expert", "none")
DEFAULT_BLOCK_MODULES = {"ffn": "mlp", "attn": "self_attn"}


def _block_modules_problem(v: Any, values: Mapping[str, Any]) -> str | None:
    ok = (
        hasattr(v, "keys")
        and set(v.keys()) <= set(DEFAULT_BLOCK_MODULES)
        and all(isinstance(x, str) and x for x in v.values())
    )
    return None if ok else "a mapping with keys ffn/attn and non-empty module names"


def _mtlora_knobs() -> tuple[Knob, ...]:
    hydra = {k.name: k for k in multihead_knobs("input_per_head", "zero_B")}
    return (
        hydra["num_heads"],
        choice_knob(
            "dropout_place",
            None,
            DROPOUT_PLACES,
            "component layers: null = the code's (one shared mask with FGR, one per expert without) or force one",
            nullable=True,
        ),
        choice_knob("init", "zero_B", ("zero_B",), "mtLoRA keeps HydraLoRA's zero-B init"),
        hydra["init_scale"],
        hydra["stable_gamma"],
        hydra["init_offset"],
        choice_knob(
            "placement", "component", PLACEMENTS, "component layers on target_modules, or block-level"
        ),
        Knob(
            "block_modules",
            DEFAULT_BLOCK_MODULES,
            "decoder sub-block module names (suffix of the full name) of the ffn / attn blocks",
            check=_block_modules_problem,
        ),
        choice_knob(
            "block_style", "lowrank", BLOCK_STYLES, "block adapter: lowrank, bottleneck (ReLU) or adaptformer"
        ),
        num_knob(
            "adaptformer_scale_init", 0.0, "adaptformer's per-expert scale init (0 as the code)", lo=None
        ),
        int_knob(
            "routing_group_size",
            None,
            "FGR: output dims per routing group (g = d_out / size, must divide); wins over routing_groups",
            nullable=True,
        ),
        int_knob("routing_groups", 1, "FGR: number g of routing groups (1 = HydraLoRA's routing)"),
        num_knob(
            "balance_weight",
            0.01,
            "weight of the balance loss (BLC) cv²(p̄), mean over layers; the same loss as MoLoRA's balance_weight",
        ),
        bool_knob(
            "blc_grad", True, "true [paper]: the balance loss trains the router; false [code]: detached"
        ),
        choice_knob(
            "spectral.mode",
            "self_gram",
            SPECTRAL_MODES,
            "spectral regulariser: self_gram, cross_expert, none",
        ),
        num_knob("spectral.lambda", 1.0, "weight λ of the spectral regulariser (0 = off)"),
        int_knob(
            "spectral.every_steps",
            500,
            "fire at steps with (step+1) % k == 0; null: once per epoch",
            nullable=True,
        ),
        int_knob(
            "spectral.max_matrices", 64, "random subset of B_i matrices per firing (seeded by the step)"
        ),
    )


MTLORA = register(
    MethodSpec(
        name="mtlora",
        layer="mtlora.adapters.mtlora.layer:MtLoraLinear",
        doc="mtLoRA: HydraLoRA + block placement + fine-grained routing + balance loss + spectral regulariser",
        knobs=_mtlora_knobs(),
        renamed={"blc_alpha": "balance_weight"},
        token_routed=True,
        rank_rule="per_head",
        heads_key="num_heads",
        router_params=("lora_router",),
    )
)
