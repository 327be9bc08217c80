"""The tiny model with adapters injected, for tests: composed presets, token batches, logits, moved weights.

One copy for every adapter family's tests (and the adapter contract, ``tests/unit/test_adapter_contract.py``).
Each ``conf/adapter`` preset is composed once per process; callers get a fresh copy to change.
"""

from __future__ import annotations

import copy
import functools

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtlora.adapters import adapter_layers, inject_adapters
from mtlora.adapters.context import AdapterContext
from mtlora.models import build_model
from tests.helpers.compose import compose_train


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_train(list(overrides))


def tiny_config(adapter: str = "lora", *overrides: str) -> DictConfig:
    """The composed train config of ``adapter=<adapter> debug=smoke`` plus ``overrides`` (a fresh copy)."""
    return copy.deepcopy(_composed((f"adapter={adapter}", "debug=smoke", *overrides)))


def tokens(seed: int = 0, rows: int = 2, length: int = 12) -> torch.Tensor:
    """A ``(rows, length)`` batch of the byte tokenizer's ordinary ids (3..258: no special tokens)."""
    return torch.randint(3, 259, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode logits of ``ids``; an adapted model first begins the forward with ``task_ids`` (or none)."""
    model.eval()
    context = getattr(model, "adapter_context", None)
    if context is not None:
        context.begin(task_ids=task_ids)
    return model(input_ids=ids).logits


def inject(cfg: DictConfig, seed: int = 0) -> tuple[nn.Module, AdapterContext]:
    """A fresh tiny base model of ``cfg.model`` with ``cfg.adapter`` injected, its init drawn after
    ``torch.manual_seed(seed)``."""
    model = build_model(cfg.model)
    torch.manual_seed(seed)
    return model, inject_adapters(model, cfg.adapter)


def injected(adapter: str = "lora", seed: int = 0, **adapter_overrides):
    """``(model, cfg, context)``: the tiny model with ``conf/adapter/<adapter>.yaml`` injected, after setting
    ``adapter_overrides`` (``key=value``, dotted keys allowed) on ``cfg.adapter``."""
    cfg = tiny_config(adapter)
    for key, value in adapter_overrides.items():
        OmegaConf.update(cfg.adapter, key, value, merge=False)
    model, context = inject(cfg, seed)
    return model, cfg, context


@torch.no_grad()
def randomise_adapters(model: nn.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Move every adapter parameter (``lora_*``) away from its init by ``scale``·N(0, 1), as training would;
    one generator over the layers in model order."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model).values():
        for name, p in layer.named_parameters():
            if name.startswith("lora"):
                p.add_(scale * torch.randn(p.shape, generator=g))
