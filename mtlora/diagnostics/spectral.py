r"""Singular-value spectra of the adapter matrices and mtLoRA's SV-band statistics (``docs/methods.md`` §6, §10.5).

Per adapter layer with ``N ≥ 2`` heads, each head's contribution ``X_i = U_i Σ_i V_iᵀ`` (singular values
``σ_{i,1} ≥ … ≥ σ_{i,R}``, ``R = min(d_out, r)``, left singular vectors ``u_{i,k}``) — ``X_i = B_i`` when the
heads share ``A`` (HydraLoRA, R-LoRA, M-LoRA, mtLoRA: what mtLoRA's fig1b notebook decomposes) and
``X_i = B_i A_i`` when each head has its own ``A_i`` (MoLoRA, MOELoRA, MultiLoRA with ``diag(v_i)``; computed
as ``B_i R_iᵀ`` from ``A_iᵀ = Q_i R_i``, which has the same ``σ`` and ``u``); the record's ``quantity`` names it
(:func:`mtlora.diagnostics.heads.head_factors`). For an SV-index band ``[p_0, p_1)`` in percent of the rank
(index ``k`` 0-based, descending order), the indices of the band are (``edges``):

* ``floor`` (mtLoRA's notebook): ``k ∈ [⌊R·p_0/100⌋, ⌊R·p_1/100⌋)`` — the top-10 % band of ``R = 8`` or
  ``4`` is empty, that of ``R = 16`` holds one value;
* ``ceil``: ``k`` with ``p_0 ≤ 100·k/R < p_1``, i.e. ``k ∈ [⌈R·p_0/100⌉, ⌈R·p_1/100⌉)`` — a band at least
  ``100/R`` wide is never empty (``R = 16``: two values in the top 10 %).

Both partition the indices when the bands partition [0, 100). Then

.. math::
    C_{band} = \frac{1}{|band|\,N(N-1)} \sum_{k\in band}\sum_{i\ne j}
        \sigma_{i,k}\,\sigma_{j,k}\,\big|\cos(u_{i,k}, u_{j,k})\big|

(cross-expert alignment), averaged over layers and also reported as a share of the sum over the bands
(``alignment_pct``, %); and the **SV importance** in %, as the paper reports it

.. math::
    I_{band} = \frac{100}{N} \sum_i \frac{\sum_{k\in band}\sigma_{i,k}}{\sum_k \sigma_{i,k}}

averaged over layers (heads with all-zero spectra are left out). An empty band gives ``None`` (the notebook
prints 0 there; the shares of the other bands are the same). Also: the SV spectrum of every ``A`` and every
head ``B_i`` (or of ``B`` for single-head adapters), the band sizes at each rank, and the mean off-diagonal
Pearson correlation of the flattened heads ``B_i`` (mtLoRA figS2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtlora.adapters.base import adapter_layers
from mtlora.diagnostics.common import nanmean, upper
from mtlora.diagnostics.heads import HeadFactors, head_factors, heads_of

DEFAULT_BANDS: tuple[tuple[float, float], ...] = ((0, 10), (10, 50), (50, 100))
EDGES = ("ceil", "floor")


def band_indices(rank: int, band, edges: str = "ceil") -> np.ndarray:
    """SV indices ``k`` (0-based, descending) of the band ``[p0, p1)`` (see the module doc for ``edges``)."""
    p0, p1 = float(band[0]), float(band[1])
    if edges == "floor":  # int() of a non-negative float, as the notebook computes its edges
        return np.arange(int(rank * p0 / 100), int(rank * p1 / 100))
    if edges != "ceil":
        raise ValueError(f"edges={edges!r}: must be one of {EDGES}")
    pos = 100.0 * np.arange(rank) / rank
    return np.nonzero((pos >= p0) & (pos < p1))[0]


def contribution_matrices(f: HeadFactors) -> torch.Tensor:
    """``(N, d_out, r)`` matrices with the singular values and left vectors of each head's contribution:
    ``B_i`` (shared ``A``) or ``B_i R_iᵀ`` with ``A_iᵀ = Q_i R_i`` (own ``A_i``: ``B_i A_i = B_i R_iᵀ Q_iᵀ``)."""
    if f.down is None:
        return f.up
    r = torch.linalg.qr(f.down.transpose(1, 2), mode="reduced").R  # (N, r, r)
    return f.up @ r.transpose(1, 2)


def head_svd(heads: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Singular values ``(N, R)`` (descending) and left singular vectors ``(N, d_out, R)`` of each head, float64."""
    u, s, _ = torch.linalg.svd(torch.as_tensor(heads).detach().double().cpu(), full_matrices=False)
    return s.numpy(), u.numpy()


def band_alignment(sv: np.ndarray, u: np.ndarray, band, edges: str = "ceil") -> float | None:
    """``C_band`` of one layer from its heads' singular values ``(N, R)`` and left vectors ``(N, d, R)``."""
    n, rank = sv.shape
    ks = band_indices(rank, band, edges)
    if n < 2 or not ks.size:
        return None
    cos = np.abs(np.einsum("idk,jdk->kij", u[:, :, ks], u[:, :, ks]))  # (|band|, N, N)
    w = sv[:, ks].T[:, :, None] * sv[:, ks].T[:, None, :]
    total = (w * cos).sum(axis=(1, 2)) - np.einsum("kii->k", w * cos)  # i ≠ j only
    return float(total.sum() / (ks.size * n * (n - 1)))


def sv_importance(sv: np.ndarray, band, edges: str = "ceil") -> float | None:
    """``I_band`` of one layer in %: mean over heads of the band's share of the head's SV sum, × 100."""
    ks = band_indices(sv.shape[1], band, edges)
    tot = sv.sum(axis=1)
    keep = tot > 0
    if not ks.size or not keep.any():
        return None
    return float(100.0 * (sv[keep][:, ks].sum(axis=1) / tot[keep]).mean())


def pearson_offdiagonal(heads: torch.Tensor) -> float | None:
    """Mean off-diagonal Pearson correlation of the flattened heads (constant heads left out)."""
    flat = torch.as_tensor(heads).detach().double().reshape(len(heads), -1).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.corrcoef(flat)
    return nanmean(upper(np.atleast_2d(c)))


def singular_values(m: torch.Tensor) -> np.ndarray:
    """Singular values (descending, float64) of a matrix, or of each matrix of a stack."""
    return torch.linalg.svdvals(torch.as_tensor(m).detach().double().cpu()).numpy()


def spectral_stats(model: nn.Module, bands=DEFAULT_BANDS, edges: str = "ceil") -> dict:
    """Spectra of every adapter layer and, over the multi-head layers, the band statistics.

    Returns ``{"bands", "edges", "quantity" (of the band statistics; "mixed" when layers differ),
    "band_sizes": {R: [|band|]}, "alignment" [per band, mean over layers], "alignment_pct",
    "sv_importance_pct", "pearson", "multi_head_layers", "layers": {name: {"quantity", "alignment",
    "sv_importance_pct", "pearson"}}, "spectra": {name: {"A": [σ], "B": [[σ of head i]]}}}`` (band values
    ``None`` without multi-head layers)."""
    if edges not in EDGES:
        raise ValueError(f"edges={edges!r}: must be one of {EDGES}")
    bands = [list(map(float, b)) for b in bands]
    layers, spectra, sizes = {}, {}, {}
    for name, layer in adapter_layers(model).items():
        a, b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        entry: dict = {}
        if isinstance(a, torch.Tensor) and a.ndim == 2:
            entry["A"] = singular_values(a)
        heads, f = heads_of(layer), head_factors(layer)
        if heads is not None and f is not None:
            raw_sv, _ = head_svd(heads)
            entry["B"] = raw_sv
            sv, u = (raw_sv, _) if f.quantity == "B_i" else head_svd(contribution_matrices(f))
            sizes[int(sv.shape[1])] = [int(band_indices(sv.shape[1], bd, edges).size) for bd in bands]
            layers[name] = {
                "quantity": f.quantity,
                "alignment": [band_alignment(sv, u, bd, edges) for bd in bands],
                "sv_importance_pct": [sv_importance(sv, bd, edges) for bd in bands],
                "pearson": pearson_offdiagonal(heads),
            }
        elif isinstance(b, torch.Tensor) and b.ndim == 2:
            entry["B"] = singular_values(b)[None]
        if entry:
            spectra[name] = entry

    def band_mean(key: str, i: int) -> float | None:
        return nanmean([v[key][i] for v in layers.values() if v[key][i] is not None])

    align = [band_mean("alignment", i) for i in range(len(bands))]
    total = sum(x for x in align if x is not None)
    quantities = {v["quantity"] for v in layers.values()}
    return {
        "bands": bands,
        "edges": edges,
        "quantity": None if not quantities else quantities.pop() if len(quantities) == 1 else "mixed",
        "band_sizes": sizes,
        "alignment": align,
        "alignment_pct": [None if x is None or total <= 0 else 100.0 * x / total for x in align],
        "sv_importance_pct": [band_mean("sv_importance_pct", i) for i in range(len(bands))],
        "pearson": nanmean([v["pearson"] for v in layers.values() if v["pearson"] is not None]),
        "multi_head_layers": len(layers),
        "layers": layers,
        "spectra": spectra,
    }
