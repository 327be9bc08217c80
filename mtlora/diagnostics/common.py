"""Helpers shared by the diagnostics: adapter layers by name, cosine matrices, JSON-safe values, batches."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlora.data.collate import collate

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


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
    for t, rows in _draw(data, split, rows_per_task, seed, tasks).items():
        ds = splits[t]
        out[t] = [
            collate(
                [ds[int(i)] for i in rows[s : s + batch_size]],
                [t] * len(rows[s : s + batch_size]),
                data.pad_id,
            )
            for s in range(0, len(rows), batch_size)
        ]
    return out


def _draw(data, split: str, rows_per_task: int, seed: int, tasks: list[int] | None = None):
    """``{task: sorted row indices}``: ``rows_per_task`` rows of each task (fewer when the split is smaller)
    drawn without replacement by a NumPy generator seeded with ``(seed, task id)``."""
    splits = data.train if split == "train" else data.eval
    out = {}
    for t in range(len(splits)) if tasks is None else tasks:
        n = min(len(splits[t]), int(rows_per_task))
        if n:
            out[t] = np.sort(
                np.random.default_rng([int(seed), int(t)]).choice(len(splits[t]), n, replace=False)
            )
    return out


def mixed_batches(
    data, split: str, rows_per_task: int, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """The rows of :func:`task_batches`, shuffled across tasks (seeded) into mixed-task batches of at most
    ``batch_size`` rows, as a training batch mixes tasks."""
    splits = data.train if split == "train" else data.eval
    pool = [(t, int(i)) for t, rows in _draw(data, split, rows_per_task, seed).items() for i in rows]
    order = np.random.default_rng([int(seed), 1 << 20]).permutation(len(pool))
    pool = [pool[i] for i in order]
    return [
        collate([splits[t][i] for t, i in chunk], [t for t, _ in chunk], data.pad_id)
        for chunk in (pool[s : s + batch_size] for s in range(0, len(pool), batch_size))
    ]


def collate_prompts(examples, task_ids, pad_id: int, side: str = "left") -> dict[str, torch.Tensor]:
    """The prompt tokens only (``input_ids[:prompt_len]``) of tokenized examples, padded on ``side``:
    ``input_ids``, ``attention_mask``, ``task_ids`` (no labels)."""
    prompts = [list(e["input_ids"][: e["prompt_len"]]) for e in examples]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p, dtype=torch.long)
        mask[i, sl] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "task_ids": torch.tensor(list(task_ids), dtype=torch.long),
    }


def pooled_prompt_batches(data, n: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` training rows drawn without replacement from the pool of every task's training rows (seeded),
    as prompts only, left-padded, in batches of ``batch_size`` — mtLoRA's fig1a sample (500 rows of the
    training file, batch 4, left padding)."""
    pool = [(t, i) for t in range(len(data.train)) for i in range(len(data.train[t]))]
    if not pool:
        return []
    pick = np.random.default_rng([int(seed), 1 << 21]).choice(
        len(pool), min(int(n), len(pool)), replace=False
    )
    rows = [pool[int(j)] for j in pick]
    return [
        collate_prompts([data.train[t][i] for t, i in chunk], [t for t, _ in chunk], data.pad_id)
        for chunk in (rows[s : s + batch_size] for s in range(0, len(rows), batch_size))
    ]


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
