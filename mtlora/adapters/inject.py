"""Find target modules with peft's matching rules and swap them for adapter layers.

Matching (as in peft's ``check_target_module_exists``):

* ``target_modules`` a **string**: the full module name must ``re.fullmatch`` it;
* a **list**: a module matches when its full name equals an entry or ends with ``"." + entry``;
* ``"all-linear"``: every ``nn.Linear`` except the output head (``lm_head``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.registry import spec_of
from mtlora.errors import ConfigError

OUTPUT_HEADS = ("lm_head",)


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether module ``name`` is selected by ``target_modules`` (peft semantics, see module doc)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return not any(name == h or name.endswith("." + h) for h in OUTPUT_HEADS)
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` selected by ``target_modules``, in model order."""
    if isinstance(target_modules, ListConfig):
        target_modules = list(target_modules)
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, target_modules)
    ]


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, adapter_cfg: DictConfig) -> list[str]:
    """Return the target names or raise a :class:`ConfigError` naming the key and the available modules."""
    tm = adapter_cfg.target_modules
    targets = find_targets(model, tm)
    if not targets:
        shown = tm if isinstance(tm, str) else list(tm)
        raise ConfigError(
            f"adapter.target_modules={shown!r} matches no linear module of the model; "
            f"linear module names available: {linear_suffixes(model)}"
        )
    if not isinstance(tm, str):  # a list: every entry must select something (a typo trains the others only)
        unmatched = [t for t in tm if not find_targets(model, [t])]
        if unmatched:
            raise ConfigError(
                f"adapter.target_modules: {unmatched} match no linear module of the model (the other entries "
                f"do); fix or drop them. Linear module names available: {linear_suffixes(model)}"
            )
    return targets


def replace_targets(
    model: nn.Module, adapter_cfg: DictConfig, cls: type[AdapterLayer], context: AdapterContext
) -> list[str]:
    """Swap every ``target_modules`` linear of ``model`` for ``cls`` (checked first); returns the names."""
    targets = check_targets(model, adapter_cfg)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        with gathered_base(base):
            layer = cls.from_config(base, name, context, adapter_cfg)
        setattr(parent, child, layer)
    return targets


def gathered_base(module: nn.Module):
    """The module's parameters gathered whole inside the block when DeepSpeed ZeRO-3 has partitioned them
    (a pretrained model loaded under ``zero.Init``), so that an adapter's init can read ``W0`` (DoRA's
    magnitude ``‖W0‖_row``); a no-op otherwise. A collective: every rank injects the same layers in order."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def inject_adapters(model: nn.Module, adapter_cfg: DictConfig) -> AdapterContext:
    """Replace every target linear layer of ``model`` by an adapter layer, in place.

    Freezes every base parameter so that only adapter parameters train. Returns the
    :class:`AdapterContext` shared by the new layers (also stored as ``model.adapter_context``).
    """
    cls = spec_of(adapter_cfg.method).layer_class()
    base_params = list(model.parameters())
    context = AdapterContext()
    # seam: a method class may place its layers itself (classmethod ``place_adapters(model, adapter_cfg,
    # context) -> names``, e.g. mtLoRA's block-level adapters and its model-level regulariser); the
    # default swaps the ``target_modules`` linears. Base parameters are frozen after a successful placement.
    place = getattr(cls, "place_adapters", None)
    if place is not None:
        targets = place(model, adapter_cfg, context)
    else:
        targets = replace_targets(model, adapter_cfg, cls, context)
    for p in base_params:
        p.requires_grad_(False)
    context.num_layers = len(targets)
    object.__setattr__(model, "adapter_context", context)
    return context
