r"""Per-task gradient cosines and conflict (``docs/methods.md`` §10.4; mtLoRA figS3, protocol inferred).

At one parameter state θ, for every task t the gradient of the LM loss (mean cross-entropy per answer
token of a batch) w.r.t. the adapter parameters is averaged over the task's k batches:

.. math::
    g_t = \frac1k \sum_{b=1}^{k} \nabla_\theta \mathcal{L}_{LM}(\theta; \text{batch}_{t,b})

and compared globally (all adapter parameters), per **transformer layer** (the adapter parameters of
decoder layer ℓ together — mtLoRA's per-layer script keys its results by layer index, so component-level and
block-level runs compare layer by layer) and per adapter module. The T×T matrix
``C_{st} = cos(g_s, g_t)`` is summarised over the unordered pairs s < t by

* ``mean_cosine`` and ``std`` (population) of the pairwise **gradient cosine similarity**: +1 = the tasks
  push the adapter the same way, 0 = unrelated, < 0 = they conflict. Higher means *more agreement*;
* ``conflict_ratio`` = share of pairs with ``C_{st} < 0`` (higher = more conflict).

Pairs involving a zero gradient have no cosine and are left out.

**Same-task noise floor.** For each task the k batches are split into two disjoint halves (the first
``⌊k/2⌋`` batches and the rest) and ``floor_t = cos(ḡ_t^{(1)}, ḡ_t^{(2)})`` of the halves' mean gradients:
the cosine that sampling noise alone leaves between two samples of the *same* task. When the floor is not
above the cross-task cosines, the cosines cannot tell conflict from sampling noise; the record says so
(``noise_floor.above_cross`` false, with a note) and more rows are needed (``batches_per_task``,
``batch_size``). Needs ``k ≥ 2``.

**Task-specific parameters** (``exclude_task_specific``, default on): parameters that only one task's rows
use — MTL-LoRA's ``Λ_t`` (``lora_lambda``) and task logits (``lora_task_logits``), MOELoRA's task embedding
(``lora_task_embedding``) — get a gradient from their own task only; these coordinates are orthogonal across
tasks by construction and pull every cosine toward 0. They are left out unless the option is off.

Gradients come from ``torch.autograd.grad``: the parameters' ``.grad`` fields are neither read nor written.
mtLoRA's "conflict reduction" between two models is :func:`cosine_drop_pct` (a relative drop of the mean
gradient cosine; see there for its sign).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtlora.adapters.base import adapter_layers
from mtlora.diagnostics.common import (
    model_device,
    nanmean,
    split_name,
    to_device,
    trainable_params,
    upper,
)
from mtlora.diagnostics.heads import gram_cosine
from mtlora.losses.causal_lm import token_cross_entropy

#: adapter parameters that only the rows of one task use (a row of them per task)
TASK_SPECIFIC = ("lora_lambda", "lora_task_logits", "lora_task_embedding")


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token cross-entropy of one batch (task ids handed to the adapter context)."""
    model.adapter_context.begin(task_ids=batch["task_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, mask = token_cross_entropy(logits, batch["labels"])
    return ce.sum() / mask.sum().clamp(min=1)


def conflict_params(
    model: nn.Module, exclude_task_specific: bool = True
) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    """``({adapter layer: [its trainable parameters]}, [names of the excluded parameters])``."""
    groups: dict[str, list[torch.Tensor]] = {}
    excluded: set[str] = set()
    for name, layer in adapter_layers(model).items():
        keep = []
        for pname, p in trainable_params(layer):
            if exclude_task_specific and pname.rsplit(".", 1)[-1] in TASK_SPECIFIC:
                excluded.add(pname.rsplit(".", 1)[-1])
            else:
                keep.append(p)
        if keep:
            groups[name] = keep
    return groups, sorted(excluded)


def _grad_halves(
    model: nn.Module, batches: list[dict], params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Flat fp32 ``(g, ḡ^{(1)}, ḡ^{(2)})``: the mean gradient over all batches and over the two halves
    (``None`` with fewer than 2 batches)."""
    device = model_device(model)
    k = len(batches)
    cut = k // 2 if k >= 2 else k
    sums = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(2)]
    for i, b in enumerate(batches):
        with torch.enable_grad():
            grads = torch.autograd.grad(lm_loss(model, to_device(b, device)), params, allow_unused=True)
        for a, g in zip(sums[0 if i < cut else 1], grads):
            if g is not None:
                a.add_(g.detach().float())
    flat = [torch.cat([s.reshape(-1) for s in half]) for half in sums]
    full = (flat[0] + flat[1]) / max(k, 1)
    if k < 2:
        return full, None, None
    return full, flat[0] / cut, flat[1] / (k - cut)


def _segment_gram(x: torch.Tensor, segments: list[tuple[int, int]], chunk: int = 1 << 22) -> np.ndarray:
    """Gram matrix of the rows of ``x`` restricted to the union of ``segments`` (float64, on x's device in
    column chunks)."""
    g = torch.zeros(len(x), len(x), dtype=torch.float64)
    for s, e in segments:
        for c in range(s, e, chunk):
            part = x[:, c : min(e, c + chunk)].double()
            g += (part @ part.T).cpu()
    return g.numpy()


def conflict_stats(m: np.ndarray) -> dict:
    """Summary of a T×T cosine matrix over its unordered pairs: ``mean_cosine``, ``std``, ``max_cosine``,
    ``conflict_ratio`` (share of pairs < 0), ``pairs``."""
    pairs = upper(m)
    pairs = pairs[np.isfinite(pairs)]
    if not pairs.size:
        return {"mean_cosine": None, "std": None, "max_cosine": None, "conflict_ratio": None, "pairs": 0}
    return {
        "mean_cosine": float(pairs.mean()),
        "std": float(pairs.std()),
        "max_cosine": float(pairs.max()),
        "conflict_ratio": float((pairs < 0).mean()),
        "pairs": int(pairs.size),
    }


def noise_floor_check(matrix: np.ndarray, floors: list[float | None]) -> tuple[bool | None, str]:
    """Whether every task's same-task floor is above each of its cross-task cosines, and a one-line note."""
    if not floors or any(f is None for f in floors):
        return None, "no same-task noise floor: needs diagnostics.conflict.batches_per_task >= 2"
    f = np.asarray(floors, dtype=float)
    n = len(f)
    pairs = [(s, t) for s in range(n) for t in range(s + 1, n) if np.isfinite(matrix[s, t])]
    if not pairs or not np.isfinite(f).all():
        return None, "no finite cross-task cosine or floor"
    ok = all(min(f[s], f[t]) > matrix[s, t] for s, t in pairs)
    cmax = max(matrix[s, t] for s, t in pairs)
    if ok:
        return True, (
            f"same-task noise floor (min {f.min():.3f} over tasks) is above every cross-task cosine "
            f"(max {cmax:.3f})"
        )
    return False, (
        f"same-task noise floor (min {f.min():.3f} over tasks) is NOT above every cross-task cosine (max "
        f"{cmax:.3f}): these cosines do not separate task conflict from sampling noise; raise "
        "diagnostics.conflict.batches_per_task or diagnostics.conflict.batch_size"
    )


def cosine_drop_pct(mean_ref: float | None, mean_new: float | None) -> float | None:
    """mtLoRA's "conflict reduction" of a model relative to a reference: ``100·(c_ref − c_new)/c_ref`` of
    the mean gradient cosines. Positive = the new model's task gradients are *less similar* (mtLoRA reads
    that as less conflict; by the sign of the cosines it is less agreement). Defined only for ``c_ref > 0``:
    for ``c_ref ≤ 0`` the ratio flips sign or divides by zero, so ``None`` is returned."""
    if mean_ref is None or mean_new is None or not mean_ref > 0:
        return None
    return 100.0 * (mean_ref - mean_new) / mean_ref


def gradient_conflict(
    model: nn.Module,
    batches_by_task: dict[int, list[dict]],
    task_names: list[str] | None = None,
    exclude_task_specific: bool = True,
) -> dict | None:
    """Gradient cosines of ``model`` between the tasks of ``batches_by_task`` (``None`` if < 2 tasks).

    Returns ``{"quantity", "tasks", "matrix" (T×T global), "mean_cosine", "std", "max_cosine",
    "conflict_ratio", "pairs", "per_layer": {layer index: {"matrix", "mean_cosine", "std", "max_cosine",
    "conflict_ratio", "pairs", "noise_floor"}}, "per_module": {adapter layer: {stats}}, "per_layer_mean",
    "noise_floor": {"per_task", "mean", "min", "above_cross", "note"}, "excluded_params",
    "batches_per_task", "rows_per_task"}``."""
    tasks = sorted(batches_by_task)
    if len(tasks) < 2:
        return None
    groups, excluded = conflict_params(model, exclude_task_specific)
    params = [p for ps in groups.values() for p in ps]
    if not params:
        return None
    segments: dict[str, tuple[int, int]] = {}
    start = 0
    for name, ps in groups.items():
        n = sum(p.numel() for p in ps)
        segments[name] = (start, start + n)
        start += n
    by_layer: dict = {}
    for name, seg in segments.items():
        idx, _ = split_name(name)
        by_layer.setdefault("other" if idx is None else idx, []).append(seg)

    full, halves = [], []
    for t in tasks:
        g, h1, h2 = _grad_halves(model, batches_by_task[t], params)
        full.append(g)
        halves.append(None if h1 is None else torch.stack([h1, h2]))
    flat = torch.stack(full)

    def floors(segs: list[tuple[int, int]]) -> list[float | None]:
        return [None if h is None else float(gram_cosine(_segment_gram(h, segs))[0, 1]) for h in halves]

    matrix = gram_cosine(_segment_gram(flat, [(0, start)]))
    per_layer = {}
    for idx, segs in by_layer.items():
        m = gram_cosine(_segment_gram(flat, segs))
        fl = [f for f in floors(segs) if f is not None and np.isfinite(f)]
        per_layer[idx] = {"matrix": m, **conflict_stats(m), "noise_floor": nanmean(fl)}
    per_module = {n: conflict_stats(gram_cosine(_segment_gram(flat, [seg]))) for n, seg in segments.items()}
    names = [task_names[t] if task_names else str(t) for t in tasks]
    floor = floors([(0, start)])
    above, note = noise_floor_check(matrix, floor)
    finite = [f for f in floor if f is not None and np.isfinite(f)]
    return {
        "quantity": "cosine similarity of per-task LM-loss gradients (higher = tasks agree; < 0 = conflict)",
        "tasks": names,
        "matrix": matrix,
        **conflict_stats(matrix),
        "per_layer": per_layer,
        "per_module": per_module,
        "per_layer_mean": nanmean(
            [v["mean_cosine"] for v in per_layer.values() if v["mean_cosine"] is not None]
        ),
        "noise_floor": {
            "per_task": dict(zip(names, floor)),
            "mean": nanmean(finite),
            "min": min(finite) if finite else None,
            "above_cross": above,
            "note": note,
        },
        "excluded_params": excluded,
        "batches_per_task": {n: len(batches_by_task[t]) for n, t in zip(names, tasks)},
        "rows_per_task": {
            n: sum(len(b["task_ids"]) for b in batches_by_task[t]) for n, t in zip(names, tasks)
        },
    }
