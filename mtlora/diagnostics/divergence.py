r"""Representation divergence between tasks (``docs/methods.md`` §10.3, estimators of §4).

The representation is the output of every adapter's down-projection ``z = A x`` (captured through
``context.begin(capture=True)``), mean-pooled over the non-padding tokens of each example
(:func:`mtlora.losses.alignment.pool` with ``masked_mean``): ``φ_ℓ(example) ∈ R^r`` per layer ℓ.
For every pair of tasks ``s < t`` and layer ℓ, with the examples of each task as the two samples:

* ``KL_ℓ(s, t)`` — the symmetric diagonal-Gaussian KL of Align-LoRA
  (:func:`mtlora.losses.alignment.gaussian_kl`: ``½(KL(p_s‖p_t) + KL(p_t‖p_s))``, unbiased variances + 1e-8);
* ``MMD_ℓ(s, t)`` — the biased multi-kernel MMD² (:func:`mtlora.losses.alignment.mmd`, 19 bandwidths).

Reported: the mean over pairs and layers (``kl``, ``mmd``), the per-layer means, and the T×T matrices
averaged over layers. Computed on held-out rows, in eval mode (no dropout), without gradients.

The diagonal-Gaussian KL is a **sum over the r dimensions** of the representation, so it grows with the
rank (and with the number of stacked heads where ``A x`` is stacked, e.g. MoLoRA's ``N·r``): methods of
different rank are not comparable on ``kl``. ``kl_per_dim`` = ``KL_ℓ / r_ℓ`` (mean over pairs and layers),
the mean per-dimension KL, is; ``dims`` gives ``r_ℓ`` per layer.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from mtlora.diagnostics.common import model_device, nanmean, to_device
from mtlora.losses.alignment import gaussian_kl, mmd, pool


@torch.no_grad()
def collect_representations(
    model: nn.Module, batches_by_task: dict[int, list[dict]]
) -> dict[int, dict[str, torch.Tensor]]:
    """``{task: {layer: (n_examples, r) pooled down-projection outputs}}`` (fp32, CPU)."""
    ctx = model.adapter_context
    device = model_device(model)
    out: dict[int, dict[str, list[torch.Tensor]]] = {}
    try:
        for t, batches in batches_by_task.items():
            for b in batches:
                b = to_device(b, device)
                ctx.begin(task_ids=b["task_ids"], capture=True)
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                for key, z in ctx.captured.items():
                    if z.ndim != 3:
                        continue
                    name = key[: -len(".lora_A")] if key.endswith(".lora_A") else key
                    out.setdefault(t, {}).setdefault(name, []).append(
                        pool(z.detach(), b["attention_mask"], "masked_mean").cpu()
                    )
    finally:
        ctx.begin()  # drop the captured tensors, capture off
    return {t: {n: torch.cat(v) for n, v in layers.items()} for t, layers in out.items()}


def representation_divergence(
    reps: dict[int, dict[str, torch.Tensor]], task_names: list[str] | None = None
) -> dict | None:
    """Mean pairwise symmetric KL and MMD² between the tasks' pooled representations (``None`` if < 2 tasks).

    Tasks with fewer than 2 examples are left out (a variance needs 2). Returns ``{"tasks", "kl",
    "kl_per_dim", "dims", "note", "mmd",
    "kl_matrix", "mmd_matrix" (T×T, mean over layers, 0 on the diagonal), "layers": {name: {"kl", "mmd"}},
    "examples_per_task"}``."""
    tasks = [t for t in sorted(reps) if reps[t] and min(len(z) for z in reps[t].values()) >= 2]
    if len(tasks) < 2:
        return None
    layer_names = [n for n in reps[tasks[0]] if all(n in reps[t] for t in tasks)]
    if not layer_names:
        return None
    k = len(tasks)
    kl_m, mmd_m = np.zeros((len(layer_names), k, k)), np.zeros((len(layer_names), k, k))
    for li, name in enumerate(layer_names):
        for a, b in itertools.combinations(range(k), 2):
            x, y = reps[tasks[a]][name], reps[tasks[b]][name]
            kl_m[li, a, b] = kl_m[li, b, a] = float(gaussian_kl(x, y))
            mmd_m[li, a, b] = mmd_m[li, b, a] = float(mmd(x, y))
    iu = np.triu_indices(k, 1)
    names = [task_names[t] if task_names else str(t) for t in tasks]
    dims = np.array([reps[tasks[0]][n].shape[-1] for n in layer_names], dtype=float)
    return {
        "tasks": names,
        "kl": float(kl_m[:, iu[0], iu[1]].mean()),
        "kl_per_dim": float((kl_m[:, iu[0], iu[1]] / dims[:, None]).mean()),
        "dims": {n: int(d) for n, d in zip(layer_names, dims)},
        "note": "kl sums over the representation's dimensions (grows with the rank): compare methods of "
        "different rank on kl_per_dim",
        "mmd": float(mmd_m[:, iu[0], iu[1]].mean()),
        "kl_matrix": kl_m.mean(0),
        "mmd_matrix": mmd_m.mean(0),
        "layers": {
            n: {"kl": nanmean(kl_m[i][iu]), "mmd": nanmean(mmd_m[i][iu])} for i, n in enumerate(layer_names)
        },
        "examples_per_task": {n: int(len(next(iter(reps[t].values())))) for n, t in zip(names, tasks)},
    }
