"""``adapter.method`` → adapter layer class. New methods register here (see CONTRIBUTING in README)."""

from __future__ import annotations

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.dora import DoraLinear
from mtlora.adapters.lora import LoraLinear
from mtlora.adapters.moelora import MoeLoraLinear
from mtlora.adapters.molora import MoLoraLinear
from mtlora.adapters.mtl_lora import MtlLoraLinear
from mtlora.adapters.mtlora_adapter import MtLoraLinear
from mtlora.adapters.multihead import HydraLoraLinear, MLoraLinear, RLoraLinear
from mtlora.adapters.multilora import MultiLoraLinear
from mtlora.adapters.split import LoraSplitLinear

ADAPTER_METHODS: dict[str, type[AdapterLayer]] = {
    "lora": LoraLinear,
    # LoraHub (mtlora/procedures/lorahub/) composes library LoRAs into one plain LoRA layer, so a composed run
    # loads (load_run), exports and evaluates exactly like adapter.method=lora
    "lorahub": LoraLinear,
    "hydralora": HydraLoraLinear,
    "rlora": RLoraLinear,
    "mlora": MLoraLinear,
    "dora": DoraLinear,
    "mtl_lora": MtlLoraLinear,
    "moelora": MoeLoraLinear,
    "mtlora": MtLoraLinear,
    "multilora": MultiLoraLinear,
    "lora_split": LoraSplitLinear,
    "molora": MoLoraLinear,
}
