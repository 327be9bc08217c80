"""Adapter layers, injection by module name, and adapter state handling.

Each method is one spec (:mod:`mtlora.adapters.methods`, torch-free, registered in
:mod:`mtlora.adapters.registry`) plus its layer module. The names below load on first access, so that
importing the registry or a spec (config validation, ``--help``) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterLayer": "mtlora.adapters.base",
    "AdapterContext": "mtlora.adapters.context",
    "BlockAdapter": "mtlora.adapters.mtlora.block",
    "DoraLinear": "mtlora.adapters.dora",
    "adapter_layers": "mtlora.adapters.base",
    "check_targets": "mtlora.adapters.inject",
    "find_targets": "mtlora.adapters.inject",
    "inject_adapters": "mtlora.adapters.inject",
    "matches_target": "mtlora.adapters.inject",
    "LoraLinear": "mtlora.adapters.lora",
    "MoeLoraLinear": "mtlora.adapters.moelora",
    "MoLoraLinear": "mtlora.adapters.molora",
    "TaskMixLoraLinear": "mtlora.adapters.task_mix",
    "TaskAwareLayer": "mtlora.adapters.task_aware",
    "MtLoraLinear": "mtlora.adapters.mtlora.layer",
    "HydraLoraLinear": "mtlora.adapters.multihead",
    "MLoraLinear": "mtlora.adapters.multihead",
    "MultiHeadLoraLinear": "mtlora.adapters.multihead",
    "RLoraLinear": "mtlora.adapters.multihead",
    "MultiLoraLinear": "mtlora.adapters.multilora",
    "ADAPTER_METHODS": "mtlora.adapters.registry",
    "SpectralRegularizer": "mtlora.adapters.mtlora.spectral_penalty",
    "cross_expert_penalty": "mtlora.adapters.mtlora.spectral_penalty",
    "self_gram_penalty": "mtlora.adapters.mtlora.spectral_penalty",
    "LoraSplitLinear": "mtlora.adapters.split",
    "adapter_buffers": "mtlora.adapters.state",
    "adapter_state_dict": "mtlora.adapters.state",
    "load_adapter": "mtlora.adapters.state",
    "load_adapter_state_dict": "mtlora.adapters.state",
    "merge_adapters": "mtlora.adapters.state",
    "save_adapter": "mtlora.adapters.state",
    "unmerge_adapters": "mtlora.adapters.state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
