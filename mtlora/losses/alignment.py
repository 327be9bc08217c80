"""Align-LoRA representation-alignment losses (Liu et al., arXiv 2508.05078; methods.md §4).

The aligned representation is the output of the LoRA down-projection, ``z = A·drop(x)`` of shape
``(B, S, r)``, captured per adapted layer. For every pair of tasks present in a micro-batch the
distributions of the two tasks' ``z`` are pulled together with either

* a symmetric diagonal-Gaussian KL (A-LoRA-K, :func:`gaussian_kl`), or
* a biased multi-kernel MMD² (A-LoRA-M, :func:`mmd`),

computed per (position, feature) statistics over the samples of each task (no token pooling by
default, pad positions included, as in the paper's code) and reduced over task pairs and layers by
:func:`alignment_loss`. Everything is computed in fp32 whatever the dtype of the captured tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MMD_BANDWIDTHS",
    "alignment_loss",
    "gaussian_kl",
    "mmd",
    "pool",
    "released_group_ids",
    "released_groups",
]

#: The 19 kernel "sigmas" of the released A-LoRA-M code (each acts as a variance: exp(-d²/(2σ))).
DEFAULT_MMD_BANDWIDTHS: tuple[float, ...] = (
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    1e-2,
    1e-1,
    1.0,
    5.0,
    10.0,
    15.0,
    20.0,
    25.0,
    30.0,
    35.0,
    100.0,
    1e3,
    1e4,
    1e5,
    1e6,
)

METRICS = ("kl", "mmd")
POOL_MODES = ("none", "mean", "masked_mean")
PAIR_REDUCTIONS = ("sum", "mean")
LAYER_REDUCTIONS = ("mean", "sum")
LAYER_SELECTIONS = ("all", "attn", "mlp")


def _check_sets(x: Tensor, y: Tensor, fn: str, min_samples: int) -> None:
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(
            f"{fn}: inputs must be (samples, ..., features) with at least 2 dims, "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{fn}: x and y must agree in every dim but the first (samples), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[0] < min_samples or y.shape[0] < min_samples:
        raise ValueError(
            f"{fn}: each set needs at least {min_samples} samples (dim 0), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _diag_gaussian_kl(mu_p: Tensor, var_p: Tensor, mu_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mu_p, diag var_p) || N(mu_q, diag var_q)) summed over the last (feature) dim."""
    terms = torch.log(var_q / var_p) + var_p / var_q + (mu_q - mu_p).pow(2) / var_q - 1.0
    return 0.5 * terms.sum(dim=-1)


def gaussian_kl(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Symmetric diagonal-Gaussian KL between two sample sets (Align-LoRA Eq. 5).

    ``x`` is ``(n, ..., r)`` and ``y`` is ``(m, ..., r)``: samples first, features last, optional
    middle dims (e.g. sequence positions). For every (position, feature) the mean and the *unbiased*
    variance are estimated over the samples of each set, with ``eps`` added to the variances:

    .. math::
        \mu_{x} = \frac{1}{n}\sum_{i} x_i, \qquad
        \sigma^2_{x} = \frac{1}{n-1}\sum_{i} (x_i - \mu_x)^2 + \varepsilon

    (likewise for ``y``), and per position

    .. math::
        \mathrm{KL}(p_x\|p_y) = \tfrac12 \sum_{d=1}^{r}\Big[\log\frac{\sigma^2_{y,d}}{\sigma^2_{x,d}}
            + \frac{\sigma^2_{x,d}}{\sigma^2_{y,d}} + \frac{(\mu_{y,d}-\mu_{x,d})^2}{\sigma^2_{y,d}} - 1\Big]

    The KL is summed over the r features and averaged over the middle (position) dims. Returned:
    the symmetric :math:`\tfrac12\big(\mathrm{KL}(p_x\|p_y) + \mathrm{KL}(p_y\|p_x)\big)` as a 0-dim
    fp32 tensor (inputs are upcast to fp32 first), differentiable w.r.t. both inputs.

    Raises ``ValueError`` when a set has fewer than 2 samples or the shapes disagree past dim 0.
    """
    _check_sets(x, y, "gaussian_kl", min_samples=2)
    xf, yf = x.float(), y.float()
    mu_x, mu_y = xf.mean(dim=0), yf.mean(dim=0)
    var_x = torch.var(xf, dim=0, correction=1) + eps
    var_y = torch.var(yf, dim=0, correction=1) + eps
    kl_xy = _diag_gaussian_kl(mu_x, var_x, mu_y, var_y)  # (...) per position
    kl_yx = _diag_gaussian_kl(mu_y, var_y, mu_x, var_x)
    return (0.5 * (kl_xy + kl_yx)).mean()


def _kernel_mean(a: Tensor, b: Tensor, bandwidths: Tensor) -> Tensor:
    """Per position mean of the multi-kernel matrix between ``a`` (P, n, r) and ``b`` (P, m, r): (P,)."""
    sq_dist = (a[:, :, None, :] - b[:, None, :, :]).pow(2).sum(dim=-1)  # (P, n, m), exact (no cancellation)
    k = torch.exp(-sq_dist[..., None] / (2.0 * bandwidths)).sum(dim=-1)  # (P, n, m)
    return k.mean(dim=(1, 2))


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> Tensor:
    r"""Biased multi-kernel MMD² between two sample sets, per position, averaged over positions.

    ``x`` is ``(n, ..., r)`` and ``y`` is ``(m, ..., r)`` (samples first, features last, optional
    middle dims). The kernel on the r features is a *sum* over the bandwidths Σ, each σ entering
    un-squared (it acts as a variance, as in the released A-LoRA-M code):

    .. math::
        k(u, v) = \sum_{\sigma\in\Sigma} \exp\!\Big(-\frac{\|u - v\|^2}{2\sigma}\Big)

    and per position the biased estimator (means over all sample pairs, diagonal included)

    .. math::
        \mathrm{MMD}^2 = \frac{1}{n^2}\sum_{i,i'} k(x_i, x_{i'}) + \frac{1}{m^2}\sum_{j,j'} k(y_j, y_{j'})
            - \frac{2}{nm}\sum_{i,j} k(x_i, y_j)

    averaged over the middle (position) dims. ``bandwidths`` defaults to the 19 values of
    :data:`DEFAULT_MMD_BANDWIDTHS`. Computed in fp32; returns a 0-dim tensor.
    """
    _check_sets(x, y, "mmd", min_samples=1)
    bw_values = DEFAULT_MMD_BANDWIDTHS if bandwidths is None else tuple(float(b) for b in bandwidths)
    if not bw_values or any(b <= 0 for b in bw_values):
        raise ValueError(f"mmd: bandwidths must be a non-empty list of positive numbers, got {bw_values}")
    r = x.shape[-1]
    xf = x.float().reshape(x.shape[0], -1, r).transpose(0, 1)  # (P, n, r)
    yf = y.float().reshape(y.shape[0], -1, r).transpose(0, 1)  # (P, m, r)
    bw = torch.tensor(bw_values, dtype=torch.float32, device=xf.device)
    per_pos = _kernel_mean(xf, xf, bw) + _kernel_mean(yf, yf, bw) - 2.0 * _kernel_mean(xf, yf, bw)
    return per_pos.mean()


def pool(z: Tensor, mask: Tensor | None, mode: str) -> Tensor:
    r"""Pool captured representations ``z`` of shape ``(B, S, r)`` over the sequence.

    * ``none``: return ``z`` unchanged (per-position statistics, pad positions included, as in the
      paper's code); ``mask`` is ignored.
    * ``mean``: :math:`\bar z_b = \frac1S \sum_s z_{b,s}` (pad positions included), shape ``(B, r)``.
    * ``masked_mean``: :math:`\bar z_b = \sum_s m_{b,s} z_{b,s} / \max(1, \sum_s m_{b,s})` with the
      ``(B, S)`` attention mask ``m``, shape ``(B, r)`` (a row without any unmasked position gives 0).

    The pooled modes accumulate and return fp32.
    """
    _check_choice("pool mode", mode, POOL_MODES)
    if mode == "none":
        return z
    if z.ndim != 3:
        raise ValueError(f"pool({mode!r}): z must be (B, S, r), got {tuple(z.shape)}")
    zf = z.float()
    if mode == "mean":
        return zf.mean(dim=1)
    if mask is None:
        raise ValueError("pool('masked_mean') needs an attention mask of shape (B, S), got None")
    if tuple(mask.shape) != tuple(z.shape[:2]):
        raise ValueError(
            f"pool('masked_mean'): mask must be (B, S) = {tuple(z.shape[:2])}, got {tuple(mask.shape)}"
        )
    m = mask.to(device=zf.device, dtype=torch.float32)
    return (zf * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def released_groups(n_rows: int, split: int, n_groups: int) -> list[int]:
    r"""Group of every position ``p = 0..N-1`` of a window under the released Align-LoRA index arithmetic.

    The released trainer splits the window's ``N`` rows into consecutive chunks of ``split`` rows (its
    gradient-accumulation count), cuts every chunk into ``n_groups`` near-equal consecutive pieces and calls
    the t-th pieces of all chunks "group t". For chunk ``c`` of length :math:`L_c` the pieces hold
    :math:`s_c = \lceil L_c / T\rceil` rows (``T = n_groups``; the last piece may hold fewer), so

    .. math::
        g(p) = \Big\lfloor \frac{p \bmod \mathrm{split}}{s_{\lfloor p/\mathrm{split}\rfloor}} \Big\rfloor

    A chunk that yields fewer than ``n_groups`` pieces (e.g. 10 rows into 8 pieces of 2 gives 5 pieces) has
    no row for the remaining groups, where the released code fails; ``ValueError`` is raised then.
    """
    if n_rows < 1 or split < 1 or n_groups < 1:
        raise ValueError(
            f"released_groups: n_rows, split, n_groups must be >= 1, got {n_rows}, {split}, {n_groups}"
        )
    out = []
    for start in range(0, n_rows, split):
        length = min(split, n_rows - start)
        size = -(-length // n_groups)
        if -(-length // size) < n_groups:
            raise ValueError(
                f"released_groups: a chunk of {length} rows splits into {-(-length // size)} pieces of {size}, "
                f"fewer than the {n_groups} groups"
            )
        out += [o // size for o in range(length)]
    return out


def released_group_ids(task_ids: Sequence[Tensor], split: int, n_groups: int) -> Tensor:
    """Group id of every row of a window of micro-batches (``task_ids``: one ``(B_i,)`` tensor per micro-batch)
    under :func:`released_groups`, rows laid out as the released sampler lays them out: each micro-batch's rows
    ordered by task id (its sampler draws the tasks in task order), micro-batches in order. Returns the ids of
    the rows in their given order, concatenated, shape ``(sum B_i,)``."""
    positions, offset = [], 0
    for ids in task_ids:
        order = torch.argsort(ids.detach().cpu(), stable=True)  # k-th row of the task-ordered layout
        pos = torch.empty_like(order)
        pos[order] = torch.arange(len(order)) + offset
        positions.append(pos)
        offset += len(order)
    groups = torch.tensor(released_groups(offset, split, n_groups), dtype=torch.long)
    return groups[torch.cat(positions)]


def _select_layers(names: Sequence[str], layers: str | Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        _check_choice("layers", layers, LAYER_SELECTIONS)
        if layers == "all":
            return list(names)
        needle = "self_attn" if layers == "attn" else ".mlp."
        return [n for n in names if needle in n]
    patterns = list(layers)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"layers must be one of {list(LAYER_SELECTIONS)} or a non-empty list of name substrings, got {layers!r}"
        )
    return [n for n in names if any(p in n for p in patterns)]


def alignment_loss(
    captured: Mapping[str, Tensor],
    task_ids: Tensor,
    attention_mask: Tensor | None,
    metric: str,
    pool_mode: str = "none",
    pair_reduce: str = "mean",
    layer_reduce: str = "mean",
    layers: str | Sequence[str] = "all",
    bandwidths: Sequence[float] | None = None,
) -> Tensor | None:
    r"""Align-LoRA loss over the captured down-projection outputs of one micro-batch.

    ``captured`` maps layer names (e.g. ``model.layers.0.mlp.up_proj.lora_A``) to ``z`` of shape
    ``(B, S, r)``; ``task_ids`` ``(B,)`` gives each row's task. For every selected layer ℓ the rows are
    pooled (:func:`pool`), split by task, tasks with fewer than 2 rows are dropped, and the metric
    ``D`` (``kl`` → :func:`gaussian_kl`, ``mmd`` → :func:`mmd`) is computed for every unordered pair
    of the remaining tasks T:

    .. math::
        L_\ell = \operatorname{reduce}_{\text{pair}}\{D(z^\ell_i, z^\ell_j) : i < j \in T\}, \qquad
        L = \operatorname{reduce}_{\text{layer}}\{L_\ell\}

    with ``pair_reduce`` ∈ {sum (paper Eq. 5), mean (released code)} and ``layer_reduce`` ∈
    {mean (released code), sum}. ``layers`` selects the captured names: ``all``, ``attn`` (names
    containing ``self_attn``), ``mlp`` (names containing ``.mlp.``) or a list of name substrings.
    The total objective is then :math:`L_{LM} + \lambda L`.

    Returns a 0-dim fp32 tensor, or ``None`` when fewer than 2 tasks have at least 2 rows (nothing to
    align). Raises ``ValueError`` for an unknown metric/pool/reduction/layer selection, for shapes that
    do not match ``task_ids``, and when no captured layer matches ``layers``.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("pool_mode", pool_mode, POOL_MODES)
    _check_choice("pair_reduce", pair_reduce, PAIR_REDUCTIONS)
    _check_choice("layer_reduce", layer_reduce, LAYER_REDUCTIONS)
    names = _select_layers(list(captured), layers)
    if not names:
        raise ValueError(
            f"alignment_loss: no captured layer matches layers={layers!r}; captured: {sorted(captured)}"
        )
    if task_ids.ndim != 1:
        raise ValueError(f"alignment_loss: task_ids must be (B,), got {tuple(task_ids.shape)}")

    ids = task_ids.detach().cpu().tolist()
    rows: dict[int, list[int]] = {}
    for row, t in enumerate(ids):
        rows.setdefault(int(t), []).append(row)
    groups = [rows[t] for t in sorted(rows) if len(rows[t]) >= 2]
    if len(groups) < 2:
        return None

    def metric_fn(a: Tensor, b: Tensor) -> Tensor:
        return gaussian_kl(a, b) if metric == "kl" else mmd(a, b, bandwidths)

    per_layer = []
    for name in names:
        z = captured[name]
        if z.shape[0] != len(ids):
            raise ValueError(
                f"alignment_loss: {name} has {z.shape[0]} rows but task_ids has {len(ids)} ({tuple(z.shape)})"
            )
        pooled = pool(z, attention_mask, pool_mode)
        parts = [pooled.index_select(0, torch.tensor(g, device=pooled.device)) for g in groups]
        pair_vals = torch.stack([metric_fn(a, b) for a, b in itertools.combinations(parts, 2)])
        per_layer.append(pair_vals.sum() if pair_reduce == "sum" else pair_vals.mean())
    stacked = torch.stack(per_layer)
    return stacked.sum() if layer_reduce == "sum" else stacked.mean()
