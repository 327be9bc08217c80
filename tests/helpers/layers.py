"""Toy adapter layers for unit tests: one adapter class around a small ``nn.Linear``, and trained-like weights."""

from __future__ import annotations

import torch
from torch import nn

from mtlora.adapters import DoraLinear, MoeLoraLinear
from mtlora.adapters.context import AdapterContext

D_IN, D_OUT, RANK, ALPHA, TASKS = 16, 12, 4, 8.0, 3


def make(cls, seed: int = 0, **kw):
    """``(layer, base, context)``: ``cls`` (DoRA, MTL-LoRA, MOELoRA) wrapping a fresh ``nn.Linear(D_IN, D_OUT)``
    at its own init (rank ``RANK``, alpha ``ALPHA``, ``TASKS`` tasks, 2 experts for MOELoRA unless ``kw``
    says otherwise)."""
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=True)
    ctx = AdapterContext()
    args = {"rank": RANK, "alpha": ALPHA, **kw}
    if cls is not DoraLinear:
        args.setdefault("num_tasks", TASKS)
    if cls is MoeLoraLinear:
        args.setdefault("num_experts", 2)
        args.setdefault("task_embed_dim", 5)
    return cls(base, "blocks.0.up_proj", ctx, **args), base, ctx


def randomise(layer: nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    """Move every trainable tensor away from its init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora"):
                p.add_(scale * torch.randn(p.shape, generator=g))
