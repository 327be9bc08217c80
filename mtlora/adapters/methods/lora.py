"""Plain LoRA (``docs/methods.md`` §0) and LoraHub (§8), whose composed result is one plain LoRA layer."""

from __future__ import annotations

from mtlora.adapters.registry import register
from mtlora.adapters.spec import MethodSpec

LORA = register(
    MethodSpec(
        name="lora",
        layer="mtlora.adapters.lora:LoraLinear",
        doc="plain LoRA: h = W0 x + s·B A drop(x)",
        peft_form="lora",
    )
)

LORAHUB = register(
    MethodSpec(
        name="lorahub",
        # mtlora/procedures/lorahub/ composes library LoRAs into one plain LoRA layer, so a composed run loads,
        # exports and evaluates exactly like adapter.method=lora
        layer="mtlora.adapters.lora:LoraLinear",
        doc="LoraHub: gradient-free composition of trained task LoRAs into one LoRA (mtlora/procedures/lorahub/)",
        peft_form="lora",
        composes_library=True,
        packing_conflict=lambda values: (
            "adapter.method=lorahub scores its few-shot rows padded (no training loop); set data.packing=false"
        ),
    )
)
