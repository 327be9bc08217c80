"""Shared-A multi-head LoRA: HydraLoRA (§1), R-LoRA (§2) and M-LoRA (§3) of ``docs/methods.md``."""

from __future__ import annotations

from mtlora.adapters.registry import register
from mtlora.adapters.spec import MethodSpec, bool_knob, choice_knob, int_knob, num_knob

DROPOUT_PLACES = ("input_per_head", "input_shared", "A_out_per_head")
INITS = ("zero_B", "rlora")
INIT_SCALES = ("paper", "code", "none")
COMBINES = ("sum", "mean")

NUM_HEADS = int_knob("num_heads", None, "number N of up-projection heads B_i (experts)", required=True)


def multihead_knobs(dropout_place: str, init: str):
    """The knobs of the family, with the method's defaults of ``dropout_place`` and ``init``."""
    return (
        NUM_HEADS,
        choice_knob(
            "dropout_place",
            dropout_place,
            DROPOUT_PLACES,
            "where dropout acts: the input per head, the input once, or A's output per head",
        ),
        choice_knob(
            "init", init, INITS, "zero_B: kaiming A, B_i = 0; rlora: R-LoRA's multi-head random init"
        ),
        choice_knob(
            "init_scale", "code", INIT_SCALES, "R-LoRA's stable scaling: code (reinit.py), paper, or none"
        ),
        num_knob("stable_gamma", 64.0, "γ of the stable scaling r^(1/4)/√γ (init=rlora)", lo_open=True),
        bool_knob(
            "init_offset", True, "subtract the initial output s·B̄_0 A_0 x (init=rlora; frozen buffers)"
        ),
    )


HYDRALORA = register(
    MethodSpec(
        name="hydralora",
        layer="mtlora.adapters.multihead:HydraLoraLinear",
        doc="HydraLoRA: shared A, N heads B_i weighted per token by softmax(W_r x)",
        knobs=multihead_knobs("input_per_head", "zero_B"),
        token_routed=True,
        rank_rule="per_head",
        heads_key="num_heads",
        router_params=("lora_router",),
    )
)

RLORA = register(
    MethodSpec(
        name="rlora",
        layer="mtlora.adapters.multihead:RLoraLinear",
        doc="R-LoRA: HydraLoRA + multi-head dropout on A's output + multi-head random init with offset",
        knobs=multihead_knobs("A_out_per_head", "rlora"),
        token_routed=True,
        rank_rule="per_head",
        heads_key="num_heads",
        router_params=("lora_router",),
    )
)

MLORA = register(
    MethodSpec(
        name="mlora",
        layer="mtlora.adapters.multihead:MLoraLinear",
        doc="M-LoRA: R-LoRA without the router, heads summed (or averaged)",
        knobs=(
            *multihead_knobs("A_out_per_head", "rlora"),
            choice_knob("combine", "sum", COMBINES, "constant head weight: 1 (sum) or 1/N (mean)"),
        ),
        peft_form="lora_from_heads",
        rank_rule="per_head",
        heads_key="num_heads",
    )
)
