r"""2-D t-SNE embeddings of adapter parameters and of A-space representations (``docs/methods.md`` §10.2-3).

* **Parameters** (HydraLoRA tsen_lora.py, R-LoRA analysis_tsne.py): every adapter sub-matrix — each ``A``
  and each up-projection head ``B_i`` (or ``B``) of every layer — flattened to one point. One group (one
  t-SNE) per matrix and **module type**, as R-LoRA embeds the ``B`` heads of all ``up_proj`` layers, of all
  ``down_proj`` layers, ... separately: e.g. ``B up_proj`` holds every head of every ``up_proj`` layer
  (``gate_proj`` and ``up_proj`` have equal shapes but are never mixed). A module type whose layers differ
  in shape is split by shape. Heads are labelled by head index (R-LoRA colours by head), ``A`` points ``A``.
* **Representations**: the pooled down-projection outputs of held-out examples at one layer
  (:func:`mtlora.diagnostics.divergence.collect_representations`), labelled by task.

``sklearn.manifold.TSNE(n_components=2, init="pca", random_state=42)``; the perplexity is capped below
the number of points (sklearn requires ``perplexity < n``). Groups with fewer than :data:`MIN_POINTS` (30)
points are skipped with a log line (an embedding of a handful of points shows nothing: t-SNE's perplexity,
30 by default, is an effective number of neighbours), as are groups whose points are all equal
(zero-initialised ``B`` heads: t-SNE is undefined there).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from mtlora.adapters.base import adapter_layers
from mtlora.diagnostics.common import split_name
from mtlora.diagnostics.heads import heads_of

log = logging.getLogger(__name__)

#: fewest points a t-SNE is computed for
MIN_POINTS = 30


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def embed(points: np.ndarray, perplexity: float = 30.0, seed: int = 42) -> np.ndarray:
    """``(n, 2)`` t-SNE embedding of the rows of ``points`` (init=pca, perplexity capped at n-1)."""
    from sklearn.manifold import TSNE

    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    perp = float(min(perplexity, max(1.0, len(x) - 1.0)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perp).fit_transform(x)


def parameter_points(model: nn.Module) -> dict[str, dict]:
    """Flattened adapter sub-matrices grouped by ``"<matrix> <module kind>"`` (and shape when a kind mixes shapes).

    Returns ``{group: {"points": (n, D) array, "labels": [...], "layer": [...], "head": [...]}}``."""
    groups: dict[str, dict] = {}
    for name, layer in adapter_layers(model).items():
        idx, kind = split_name(name)
        mats: list[tuple[str, int | None, torch.Tensor]] = []
        a = getattr(layer, "lora_A", None)
        if isinstance(a, torch.Tensor) and a.ndim == 2:
            mats.append(("A", None, a.detach()))
        heads = heads_of(layer)
        b = getattr(layer, "lora_B", None)
        if heads is not None:
            mats += [("B", i, h) for i, h in enumerate(heads)]
        elif isinstance(b, torch.Tensor):
            mats.append(("B", None, b.detach()))
        for kind_m, head, m in mats:
            g = groups.setdefault(
                (f"{kind_m} {kind}", tuple(m.shape)), {"points": [], "labels": [], "layer": [], "head": []}
            )
            g["points"].append(m.float().reshape(-1).cpu().numpy())
            g["labels"].append(kind_m if head is None else f"{kind_m} head {head}")
            g["layer"].append(idx)
            g["head"].append(head)
    shapes: dict[str, int] = {}
    for key, _ in groups:
        shapes[key] = shapes.get(key, 0) + 1
    out = {}
    for (key, shape), v in groups.items():
        pts = np.stack(v["points"])
        name = key if shapes[key] == 1 else f"{key} {'x'.join(map(str, shape))}"
        if len(pts) < MIN_POINTS:
            log.info(
                "t-SNE of the parameter group %s skipped: %d points (fewer than %d)",
                name,
                len(pts),
                MIN_POINTS,
            )
        elif _spread(pts):
            out[name] = {**v, "points": pts}
    return out


def _spread(points: np.ndarray) -> bool:
    """Finite points that are not all equal (t-SNE of identical points, e.g. zero-init B heads, is undefined)."""
    return bool(np.isfinite(points).all() and np.ptp(points, axis=0).max() > 0)


def parameter_tsne(model: nn.Module, perplexity: float = 30.0) -> dict[str, dict]:
    """t-SNE of every parameter group of :func:`parameter_points`: ``{group: {"xy": (n, 2), "labels", ...}}``."""
    out = {}
    for k, g in parameter_points(model).items():
        out[k] = {
            "xy": embed(g["points"], perplexity),
            "labels": g["labels"],
            "layer": g["layer"],
            "head": g["head"],
        }
    return out


def representation_tsne(
    reps: dict[int, dict[str, torch.Tensor]],
    layer: str,
    task_names: list[str] | None = None,
    perplexity: float = 30.0,
) -> dict | None:
    """t-SNE of the pooled representations at ``layer`` of every task: ``{"xy", "labels" (task names)}``."""
    xs, labels = [], []
    for t in sorted(reps):
        if layer in reps[t]:
            z = reps[t][layer].float().numpy()
            xs.append(z)
            labels += [task_names[t] if task_names else str(t)] * len(z)
    n = sum(len(x) for x in xs)
    if n < MIN_POINTS:
        log.info(
            "t-SNE of the representations at %s skipped: %d points (fewer than %d)", layer, n, MIN_POINTS
        )
        return None
    if not _spread(np.concatenate(xs)):
        return None
    return {"xy": embed(np.concatenate(xs), perplexity), "labels": labels, "layer": layer}
