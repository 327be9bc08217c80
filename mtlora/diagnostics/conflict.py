r"""Per-task gradient conflict (``docs/methods.md`` §10.4; mtLoRA figS3, protocol inferred).

At one parameter state θ, for every task t the gradient of the LM loss (mean cross-entropy per answer
token of a batch) w.r.t. the adapter parameters is averaged over the task's k batches:

.. math::
    g_t = \frac1k \sum_{b=1}^{k} \nabla_\theta \mathcal{L}_{LM}(\theta; \text{batch}_{t,b})

and flattened globally (all adapter parameters) and per adapter layer. The T×T matrix
``C_{st} = cos(g_s, g_t)`` is summarised over the unordered pairs s < t by

* the mean and the (population) std of the off-diagonal cosines, and
* the **conflict ratio** = share of pairs with ``C_{st} < 0``.

Pairs involving a zero gradient have no cosine and are left out. Gradients come from
``torch.autograd.grad``: the parameters' ``.grad`` fields are neither read nor written.
mtLoRA's relative reduction between two models on the same tasks and batches is :func:`relative_reduction`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtlora.diagnostics.common import (
    adapter_layers,
    cosine_matrix,
    model_device,
    nanmean,
    to_device,
    trainable_params,
    upper,
)
from mtlora.training.loss import token_cross_entropy


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token cross-entropy of one batch (task ids handed to the adapter context)."""
    model.adapter_context.begin(task_ids=batch["task_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, mask = token_cross_entropy(logits, batch["labels"])
    return ce.sum() / mask.sum().clamp(min=1)


def task_gradients(
    model: nn.Module, batches_by_task: dict[int, list[dict]], params: list[torch.Tensor]
) -> dict[int, list[torch.Tensor]]:
    """``{task: [mean gradient of each parameter over the task's batches]}`` (fp32, detached)."""
    device = model_device(model)
    out: dict[int, list[torch.Tensor]] = {}
    for t, batches in batches_by_task.items():
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for b in batches:
            with torch.enable_grad():
                grads = torch.autograd.grad(lm_loss(model, to_device(b, device)), params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().float())
        out[t] = [a / max(len(batches), 1) for a in acc]
    return out


def conflict_stats(m: np.ndarray) -> dict:
    """Summary of a T×T cosine matrix over its unordered pairs: mean, std, conflict ratio (share < 0)."""
    pairs = upper(m)
    pairs = pairs[np.isfinite(pairs)]
    if not pairs.size:
        return {"mean": None, "std": None, "conflict_ratio": None, "pairs": 0}
    return {
        "mean": float(pairs.mean()),
        "std": float(pairs.std()),
        "conflict_ratio": float((pairs < 0).mean()),
        "pairs": int(pairs.size),
    }


def relative_reduction(mean_a: float, mean_b: float) -> float:
    """mtLoRA's "conflict reduction" of model b relative to model a: ``(mean_a − mean_b) / mean_a``."""
    return (mean_a - mean_b) / mean_a


def gradient_conflict(
    model: nn.Module, batches_by_task: dict[int, list[dict]], task_names: list[str] | None = None
) -> dict | None:
    """Gradient-conflict statistics of ``model`` over the tasks of ``batches_by_task`` (``None`` if < 2).

    Returns ``{"tasks", "matrix" (T×T global), "mean", "std", "conflict_ratio", "pairs", "per_layer":
    {layer: {"matrix", "mean", "std", "conflict_ratio"}}, "per_layer_mean", "batches_per_task"}``."""
    tasks = sorted(batches_by_task)
    if len(tasks) < 2:
        return None
    groups = {name: [p for _, p in trainable_params(layer)] for name, layer in adapter_layers(model).items()}
    groups = {k: v for k, v in groups.items() if v}
    params = [p for ps in groups.values() for p in ps]
    if not params:
        return None
    grads = task_gradients(model, {t: batches_by_task[t] for t in tasks}, params)
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads[t]]) for t in tasks])
    matrix = cosine_matrix(flat)
    per_layer, start = {}, 0
    for name, ps in groups.items():
        n = sum(p.numel() for p in ps)
        m = cosine_matrix(flat[:, start : start + n])
        per_layer[name] = {"matrix": m, **conflict_stats(m)}
        start += n
    names = [task_names[t] if task_names else str(t) for t in tasks]
    return {
        "tasks": names,
        "matrix": matrix,
        **conflict_stats(matrix),
        "per_layer": per_layer,
        "per_layer_mean": nanmean([v["mean"] for v in per_layer.values() if v["mean"] is not None]),
        "batches_per_task": {n: len(batches_by_task[t]) for n, t in zip(names, tasks)},
    }
