"""Helpers shared by the diagnostics: adapter layers by name, cosine matrices, JSON-safe values, batches."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.data.collate import collate

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def split_name(name: str) -> tuple[int | None, str]:
    """``(layer index, module kind)`` of an adapter name: ``model.layers.3.mlp.up_proj`` → ``(3, "up_proj")``."""
    m = _LAYER_INDEX.findall(name)
    return (int(m[-1]) if m else None), name.rsplit(".", 1)[-1]


def trainable_params(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The layer's own trainable (adapter) parameters, the frozen base layer excluded."""
    return [
        (n, p) for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer.")
    ]


def cosine_matrix(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, N)`` cosine similarities of the rows of ``vectors`` (``(N, D)``), float64.

    ``cos(a, b) = <a, b> / (‖a‖ ‖b‖)``; entries that involve a zero vector are undefined (NaN)."""
    v = torch.as_tensor(vectors).detach().double().reshape(len(vectors), -1).cpu()
    norms = v.norm(dim=1)
    gram = v @ v.T
    with np.errstate(divide="ignore", invalid="ignore"):
        m = (gram / (norms[:, None] * norms[None, :])).numpy()
    m[~np.isfinite(m)] = np.nan
    return np.clip(m, -1.0, 1.0)


def upper(m: np.ndarray) -> np.ndarray:
    """The strict upper triangle of a square matrix, as a flat array (one value per unordered pair)."""
    return np.asarray(m)[np.triu_indices(len(m), 1)]


def nanmean(values) -> float | None:
    """Mean of the finite values, ``None`` when there is none."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def jsonable(x: Any) -> Any:
    """``x`` with numpy/torch values turned into Python ones and NaN/inf into ``None`` (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def task_batches(
    data, split: str, rows_per_task: int, batch_size: int, seed: int, tasks: list[int] | None = None
) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Fixed batches of each task's ``train`` or ``eval`` rows: ``{task id: [batch, ...]}``.

    ``rows_per_task`` rows per task (fewer when the split is smaller) drawn without replacement by a
    NumPy generator seeded with ``(seed, task id)`` — the same rows at every call, and no global RNG used —
    collated into batches of at most ``batch_size`` rows (:func:`mtlora.data.collate.collate`)."""
    out: dict[int, list[dict[str, torch.Tensor]]] = {}
    splits = data.train if split == "train" else data.eval
    for t in range(len(splits)) if tasks is None else tasks:
        ds = splits[t]
        n = min(len(ds), int(rows_per_task))
        if n == 0:
            continue
        rows = np.sort(np.random.default_rng([int(seed), int(t)]).choice(len(ds), n, replace=False))
        batches = []
        for s in range(0, n, batch_size):
            chunk = [ds[int(i)] for i in rows[s : s + batch_size]]
            batches.append(collate(chunk, [t] * len(chunk), data.pad_id))
        out[t] = batches
    return out


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
