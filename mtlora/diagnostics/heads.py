r"""Inter-head similarity of multi-head adapters (``docs/methods.md`` §10.1; R-LoRA analysis_cos.py).

For every adapter layer ℓ (layer index × module kind) with ``N ≥ 2`` up-projection heads
``B_1 … B_N ∈ R^{d_out×r}``, each head is flattened to a vector ``b_i ∈ R^{d_out·r}`` and

.. math::
    S_{ij} = \frac{\langle b_i, b_j\rangle}{\|b_i\|\,\|b_j\|}, \qquad
    \mathrm{sim}_\ell = \frac{2}{N(N-1)} \sum_{i<j} S_{ij}

(the mean of the strict upper triangle = the mean off-diagonal entry). Raw weights (scale included).
A pair involving an all-zero head (HydraLoRA's ``B = 0`` init) has no cosine: it is left out, and a layer
whose heads are all zero reports ``None``.

Heads are the adapters' ``lora_B`` of shape ``(N, d_out, r)`` (HydraLoRA, R-LoRA, M-LoRA, mtLoRA, MoLoRA,
MultiLoRA, MTL-LoRA's up-projections) or, for MOELoRA, the ``E`` column blocks of ``lora_B`` (``d_out, r``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtlora.diagnostics.common import adapter_layers, cosine_matrix, nanmean, split_name, upper


def heads_of(layer: nn.Module) -> torch.Tensor | None:
    """The layer's up-projection heads as ``(N, d_out, r)`` (detached), or ``None`` with fewer than 2."""
    b = getattr(layer, "lora_B", None)
    if not isinstance(b, torch.Tensor):
        return None
    b = b.detach()
    if b.ndim == 3 and b.shape[0] >= 2:
        return b
    experts, er = getattr(layer, "num_experts", None), getattr(layer, "expert_rank", None)
    if b.ndim == 2 and isinstance(experts, int) and isinstance(er, int) and experts >= 2:
        return b.view(b.shape[0], experts, er).permute(
            1, 0, 2
        )  # MOELoRA: expert i = columns [i·r_e, (i+1)·r_e)
    return None


def head_cosine_matrix(heads: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, N)`` cosine matrix of the flattened heads ``heads[i]`` (NaN where a head is all zero)."""
    return cosine_matrix(torch.as_tensor(heads).reshape(len(heads), -1))


def mean_offdiagonal(m: np.ndarray) -> float | None:
    """Mean of the strict upper triangle of ``m`` over its finite entries (``None`` when there is none)."""
    return nanmean(upper(m))


def head_similarity(model: nn.Module) -> dict | None:
    """Inter-head similarity of every multi-head adapter layer of ``model``.

    Returns ``None`` when no layer has 2 or more heads, else ``{"mean": mean over layers, "layers":
    {name: sim}, "by_module": {kind: {"layer": [indices], "similarity": [sims]}}, "num_heads": {name: N}}``.
    """
    layers: dict[str, float | None] = {}
    heads_n: dict[str, int] = {}
    for name, layer in adapter_layers(model).items():
        h = heads_of(layer)
        if h is None:
            continue
        layers[name] = mean_offdiagonal(head_cosine_matrix(h))
        heads_n[name] = int(h.shape[0])
    if not layers:
        return None
    by_module: dict[str, dict[str, list]] = {}
    for name, sim in layers.items():
        idx, kind = split_name(name)
        entry = by_module.setdefault(kind, {"layer": [], "similarity": []})
        entry["layer"].append(idx)
        entry["similarity"].append(sim)
    return {
        "mean": nanmean([v for v in layers.values() if v is not None]),
        "layers": layers,
        "by_module": by_module,
        "num_heads": heads_n,
    }
