"""Adapter layers, injection by module name, and adapter state handling."""

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.block import BlockAdapter
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.dora import DoraLinear
from mtlora.adapters.inject import (
    adapter_layers,
    check_targets,
    find_targets,
    inject_adapters,
    matches_target,
)
from mtlora.adapters.lora import LoraLinear
from mtlora.adapters.moelora import MoeLoraLinear
from mtlora.adapters.molora import MoLoraLinear
from mtlora.adapters.mtl_lora import MtlLoraLinear, TaskAwareLayer
from mtlora.adapters.mtlora_adapter import MtLoraLinear
from mtlora.adapters.multihead import HydraLoraLinear, MLoraLinear, MultiHeadLoraLinear, RLoraLinear
from mtlora.adapters.multilora import MultiLoraLinear
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.adapters.spectral import SpectralRegularizer, cross_expert_penalty, self_gram_penalty
from mtlora.adapters.split import LoraSplitLinear
from mtlora.adapters.state import (
    adapter_buffers,
    adapter_state_dict,
    load_adapter,
    load_adapter_state_dict,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)

__all__ = [
    "ADAPTER_METHODS",
    "AdapterContext",
    "AdapterLayer",
    "BlockAdapter",
    "DoraLinear",
    "HydraLoraLinear",
    "LoraLinear",
    "LoraSplitLinear",
    "MLoraLinear",
    "MoLoraLinear",
    "MoeLoraLinear",
    "MtLoraLinear",
    "MtlLoraLinear",
    "MultiHeadLoraLinear",
    "MultiLoraLinear",
    "RLoraLinear",
    "SpectralRegularizer",
    "TaskAwareLayer",
    "adapter_buffers",
    "adapter_layers",
    "adapter_state_dict",
    "check_targets",
    "cross_expert_penalty",
    "find_targets",
    "inject_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "matches_target",
    "merge_adapters",
    "save_adapter",
    "self_gram_penalty",
    "unmerge_adapters",
]
