r"""Singular-value spectra of the adapter matrices and mtLoRA's SV-band statistics (``docs/methods.md`` §6, §10.5).

Per adapter layer with ``N ≥ 2`` up-projection heads ``B_i = U_i Σ_i V_iᵀ`` (singular values
``σ_{i,1} ≥ … ≥ σ_{i,R}``, ``R = min(d_out, r)``, left singular vectors ``u_{i,k}``), for an SV-index band
``[p_0, p_1)`` given in percent of the rank — index ``k`` (0-based, descending order) belongs to the band
when ``p_0 ≤ 100·k/R < p_1``, so the bands of a partition of [0, 100) partition the indices:

.. math::
    C_{band} = \frac{1}{|band|\,N(N-1)} \sum_{k\in band}\sum_{i\ne j}
        \sigma_{i,k}\,\sigma_{j,k}\,\big|\cos(u_{i,k}, u_{j,k})\big|

(cross-expert alignment), averaged over layers and also reported as a share of the sum over the bands
(``alignment_pct``, %); and the **SV importance**

.. math::
    I_{band} = \frac1N \sum_i \frac{\sum_{k\in band}\sigma_{i,k}}{\sum_k \sigma_{i,k}}

averaged over layers (heads with all-zero spectra are left out; an empty band gives ``None``). Also: the SV
spectrum of every ``A`` and every head ``B_i`` (or of ``B`` for single-head adapters) and the mean
off-diagonal Pearson correlation of the flattened heads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mtlora.diagnostics.common import adapter_layers, nanmean, upper
from mtlora.diagnostics.heads import heads_of

DEFAULT_BANDS: tuple[tuple[float, float], ...] = ((0, 10), (10, 50), (50, 100))


def band_indices(rank: int, band) -> np.ndarray:
    """SV indices ``k`` (0-based, descending) with ``p0 ≤ 100·k/rank < p1``."""
    p0, p1 = float(band[0]), float(band[1])
    pos = 100.0 * np.arange(rank) / rank
    return np.nonzero((pos >= p0) & (pos < p1))[0]


def head_svd(heads: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Singular values ``(N, R)`` (descending) and left singular vectors ``(N, d_out, R)`` of each head, float64."""
    u, s, _ = torch.linalg.svd(torch.as_tensor(heads).detach().double().cpu(), full_matrices=False)
    return s.numpy(), u.numpy()


def band_alignment(sv: np.ndarray, u: np.ndarray, band) -> float | None:
    """``C_band`` of one layer from its heads' singular values ``(N, R)`` and left vectors ``(N, d, R)``."""
    n, rank = sv.shape
    ks = band_indices(rank, band)
    if n < 2 or not ks.size:
        return None
    cos = np.abs(np.einsum("idk,jdk->kij", u[:, :, ks], u[:, :, ks]))  # (|band|, N, N)
    w = sv[:, ks].T[:, :, None] * sv[:, ks].T[:, None, :]
    total = (w * cos).sum(axis=(1, 2)) - np.einsum("kii->k", w * cos)  # i ≠ j only
    return float(total.sum() / (ks.size * n * (n - 1)))


def sv_importance(sv: np.ndarray, band) -> float | None:
    """``I_band`` of one layer: mean over heads of the band's share of the head's SV sum."""
    ks = band_indices(sv.shape[1], band)
    tot = sv.sum(axis=1)
    keep = tot > 0
    if not ks.size or not keep.any():
        return None
    return float((sv[keep][:, ks].sum(axis=1) / tot[keep]).mean())


def pearson_offdiagonal(heads: torch.Tensor) -> float | None:
    """Mean off-diagonal Pearson correlation of the flattened heads (constant heads left out)."""
    flat = torch.as_tensor(heads).detach().double().reshape(len(heads), -1).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.corrcoef(flat)
    return nanmean(upper(np.atleast_2d(c)))


def singular_values(m: torch.Tensor) -> np.ndarray:
    """Singular values (descending, float64) of a matrix, or of each matrix of a stack."""
    return torch.linalg.svdvals(torch.as_tensor(m).detach().double().cpu()).numpy()


def spectral_stats(model: nn.Module, bands=DEFAULT_BANDS) -> dict:
    """Spectra of every adapter layer and, over the multi-head layers, the band statistics.

    Returns ``{"bands", "alignment" [per band, mean over layers], "alignment_pct", "sv_importance",
    "pearson", "multi_head_layers", "layers": {name: {"alignment", "sv_importance", "pearson"}},
    "spectra": {name: {"A": [σ], "B": [[σ of head i]]}}}`` (band values ``None`` without multi-head layers)."""
    bands = [list(map(float, b)) for b in bands]
    layers, spectra = {}, {}
    for name, layer in adapter_layers(model).items():
        a, b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        entry: dict = {}
        if isinstance(a, torch.Tensor) and a.ndim == 2:
            entry["A"] = singular_values(a)
        heads = heads_of(layer)
        if heads is not None:
            sv, u = head_svd(heads)
            entry["B"] = sv
            layers[name] = {
                "alignment": [band_alignment(sv, u, bd) for bd in bands],
                "sv_importance": [sv_importance(sv, bd) for bd in bands],
                "pearson": pearson_offdiagonal(heads),
            }
        elif isinstance(b, torch.Tensor) and b.ndim == 2:
            entry["B"] = singular_values(b)[None]
        if entry:
            spectra[name] = entry
    align = [
        nanmean([v["alignment"][i] for v in layers.values() if v["alignment"][i] is not None])
        for i in range(len(bands))
    ]
    total = sum(x for x in align if x is not None)
    return {
        "bands": bands,
        "alignment": align,
        "alignment_pct": [None if x is None or total <= 0 else 100.0 * x / total for x in align],
        "sv_importance": [
            nanmean([v["sv_importance"][i] for v in layers.values() if v["sv_importance"][i] is not None])
            for i in range(len(bands))
        ],
        "pearson": nanmean([v["pearson"] for v in layers.values() if v["pearson"] is not None]),
        "multi_head_layers": len(layers),
        "layers": layers,
        "spectra": spectra,
    }
