r"""Inter-head similarity of multi-head adapters (``docs/methods.md`` §10.1; R-LoRA analysis_cos.py).

For every adapter layer ℓ (layer index × module kind) with ``N ≥ 2`` heads, each head's **contribution**
``X_i`` is flattened to a vector and

.. math::
    S_{ij} = \frac{\langle X_i, X_j\rangle_F}{\|X_i\|_F\,\|X_j\|_F}, \qquad
    \mathrm{sim}_\ell = \frac{2}{N(N-1)} \sum_{i<j} S_{ij}

(the mean of the strict upper triangle = the mean off-diagonal entry). The contribution compared (the
record's ``quantity``) is what a head adds to the layer's weight:

* ``B_i`` when the heads share one down-projection ``A`` (HydraLoRA, R-LoRA, M-LoRA, mtLoRA, MTL-LoRA's
  up-projections): ``ΔW_i = B_i A`` differ only through ``B_i``, and R-LoRA's script compares ``B_i``;
  ``s_i B_i`` for mtLoRA's adaptformer blocks (learned per-expert scale ``s_i``);
* ``B_i A_i`` when every head has its own ``A_i`` (MoLoRA; MOELoRA's experts = row blocks of ``A`` and column
  blocks of ``B``), and ``diag(v_i) B_i A_i`` for MultiLoRA (learned per-head output scale ``v_i``, 0 at
  init): ``B_i`` alone says nothing about the update when the ``A_i`` differ.

Router/gate weights, the global ``α/r`` and MTL-LoRA's ``Λ_t`` are left out (input- or task-dependent, or the
same for every head). Raw weights, scale included. A pair involving an all-zero contribution (``B = 0`` or
``v = 0`` at init) has no cosine: it is left out, and a layer whose heads are all zero reports ``None``.

Also reported, per layer and as means over layers:

* ``delta_w``: the similarity of ``ΔW_i = B_i A_i`` (``B_i A`` with a shared ``A``) for every method — the
  one quantity that means the same for all adapters, for cross-method comparisons (``None`` for
  mtLoRA's ReLU blocks, whose heads have no weight update);
* ``increment``: the similarity of ``X_i − X_i(0)`` (the learned change). With R-LoRA's / M-LoRA's random
  init the raw similarity mostly measures the init (independent random heads are near-orthogonal); the
  increment separates what training did. ``X_i(0)`` comes from the run's :data:`INIT_FILE`, written by the
  training loop before the first step (:func:`save_initial_heads`; heads that start at zero are listed,
  not stored, and their increment equals the raw similarity). Without the file the increment is ``None``.

``ΔW`` similarities are computed from ``r×r`` Gram matrices, never forming ``d_out×d_in`` products:
``⟨B_i A_i, B_j A_j⟩_F = Σ_{kl} (B_iᵀB_j)_{kl} (A_iA_jᵀ)_{kl}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtlora.adapters.base import AdapterLayer, adapter_layers
from mtlora.diagnostics.common import nanmean, split_name, upper

#: the initial head contributions of a run (run-dir relative), written before the first optimizer step
INIT_FILE = "init_heads.safetensors"


@dataclass
class HeadFactors:
    """The heads of one layer as low-rank factors: head ``i`` contributes ``up[i]`` (shared ``A``) or
    ``up[i] @ down[i]`` (own ``A_i``); ``shared_down`` is the shared ``A`` (for ``ΔW_i = up[i] @ A``)."""

    quantity: str
    up: torch.Tensor  # (N, d_out, r_h), per-head output scale folded in
    down: torch.Tensor | None  # (N, r_h, d_in): own A_i, or None (shared A)
    shared_down: torch.Tensor | None  # (r, d_in): the shared A, or None
    linear: bool = True  # whether up_i @ A is the head's weight update (False: a non-linearity between)

    @property
    def n(self) -> int:
        return int(self.up.shape[0])

    def delta_w_down(self) -> torch.Tensor | None:
        """The per-head ``A`` of ``ΔW_i`` as ``(N, r_h, d_in)`` (the shared ``A`` repeated), or ``None``."""
        if not self.linear:
            return None
        if self.down is not None:
            return self.down
        if self.shared_down is None:
            return None
        return self.shared_down.unsqueeze(0).expand(self.n, *self.shared_down.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors that define the compared quantity (for :data:`INIT_FILE`)."""
        out = {"up": self.up}
        if self.down is not None:
            out["down"] = self.down
        if self.shared_down is not None:
            out["shared_down"] = self.shared_down
        return out


def heads_of(layer: AdapterLayer) -> torch.Tensor | None:
    """The layer's raw up-projection heads ``B_i`` as ``(N, d_out, r)`` (detached, from
    :meth:`~mtlora.adapters.base.AdapterLayer.up_heads`), or ``None`` with fewer than 2."""
    b = layer.up_heads()
    if b is None or b.shape[0] < 2:
        return None
    return b.detach()


def head_factors(layer: nn.Module) -> HeadFactors | None:
    """What each head of ``layer`` contributes (see the module doc), fp64 on the layer's device; ``None``
    under 2 heads."""
    b = heads_of(layer)
    a = getattr(layer, "lora_A", None)
    if b is None or not isinstance(a, torch.Tensor) or a.ndim != 2:
        return None
    b, a = b.detach().double(), a.detach().double()
    n, _, r = b.shape
    scale = getattr(layer, "lora_scale", None)
    if a.shape[0] == n * r:  # every head its own A_i = rows [i·r, (i+1)·r) (MoLoRA, MultiLoRA, MOELoRA)
        if isinstance(scale, torch.Tensor) and scale.shape == (n, b.shape[1]):  # MultiLoRA's v_i
            up = scale.detach().double().unsqueeze(-1) * b
            return HeadFactors("diag(v_i) B_i A_i", up, a.view(n, r, -1), None)
        return HeadFactors("B_i A_i", b, a.view(n, r, -1), None)
    if a.shape[0] != r:
        return None
    linear = getattr(layer, "style", "lowrank") == "lowrank"  # mtLoRA blocks: ReLU between A and B otherwise
    if isinstance(scale, torch.Tensor) and scale.shape == (n,):  # mtLoRA adaptformer: per-expert scalar
        return HeadFactors("s_i B_i", scale.detach().double().view(n, 1, 1) * b, None, a, linear)
    return HeadFactors("B_i", b, None, a, linear)


def lowrank_gram(up: torch.Tensor, down: torch.Tensor) -> np.ndarray:
    """``G_ij = ⟨U_i D_i, U_j D_j⟩_F`` for ``U`` ``(N, d_out, r)`` and ``D`` ``(N, r, d_in)``, via ``r×r`` Grams."""
    n, r = up.shape[0], up.shape[2]
    u = up.permute(1, 0, 2).reshape(up.shape[1], n * r)  # (d_out, N·r): one matmul for all pairs
    d = down.reshape(n * r, -1)
    uu = (u.T @ u).view(n, r, n, r)
    dd = (d @ d.T).view(n, r, n, r)
    return (uu * dd).sum((1, 3)).cpu().numpy()


def flat_gram(x: torch.Tensor) -> np.ndarray:
    v = x.reshape(len(x), -1)
    return (v @ v.T).cpu().numpy()


def gram_cosine(g: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix (NaN where a vector is zero)."""
    d = np.sqrt(np.clip(np.diag(g), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        m = g / (d[:, None] * d[None, :])
    m[~np.isfinite(m)] = np.nan
    return np.clip(m, -1.0, 1.0)


def head_cosine_matrix(heads: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, N)`` cosine matrix of the flattened ``heads[i]`` (NaN where a head is all zero)."""
    return gram_cosine(flat_gram(torch.as_tensor(heads).detach().double().cpu()))


def contribution_cosine(f: HeadFactors, init: HeadFactors | None = None) -> np.ndarray:
    """Cosine matrix of the heads' contributions ``X_i`` (``X_i − X_i(0)`` when ``init`` is given)."""
    if init is not None:
        dev = f.up.device
        init = HeadFactors(
            init.quantity, init.up.to(dev), None if init.down is None else init.down.to(dev), None
        )
    if f.down is None:
        return head_cosine_matrix(f.up if init is None else f.up - init.up)
    if init is None:
        return gram_cosine(lowrank_gram(f.up, f.down))
    # X_i − X_i(0) = [U_i, −U_i(0)] [D_i; D_i(0)]: one low-rank product of twice the rank
    return gram_cosine(lowrank_gram(torch.cat([f.up, -init.up], 2), torch.cat([f.down, init.down], 1)))


def delta_w_cosine(f: HeadFactors) -> np.ndarray | None:
    """Cosine matrix of ``ΔW_i = B_i A_i`` (``B_i A`` with a shared ``A``); ``None`` without a weight update."""
    down = f.delta_w_down()
    return None if down is None else gram_cosine(lowrank_gram(f.up, down))


def mean_offdiagonal(m: np.ndarray | None) -> float | None:
    """Mean of the strict upper triangle of ``m`` over its finite entries (``None`` when there is none)."""
    return None if m is None else nanmean(upper(m))


# ---------------------------------------------------------------- initial heads


def _nonzero(f: HeadFactors) -> bool:
    if f.down is None:
        return bool(f.up.abs().max() > 0)
    return bool(f.up.abs().max() > 0 and f.down.abs().max() > 0)


def save_initial_heads(model: nn.Module, run_dir: str | Path) -> Path | None:
    """Write the initial head contributions of ``model`` to ``run_dir/`` :data:`INIT_FILE` (before training).

    Nothing is written when the file exists (a resumed run keeps the first one) or the model has no
    multi-head layer. Layers whose contribution starts at zero are listed in the metadata, not stored."""
    from safetensors.torch import save_file

    path = Path(run_dir) / INIT_FILE
    if path.exists():
        return None
    factors = {n: f for n, layer in adapter_layers(model).items() if (f := head_factors(layer)) is not None}
    if not factors:
        return None
    tensors = {
        f"{name}::{k}": v.float().cpu().contiguous()
        for name, f in factors.items()
        if _nonzero(f)
        for k, v in f.tensors().items()
    }
    meta = {"layers": json.dumps({n: f.quantity for n, f in factors.items()})}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_initial_heads(run_dir: str | Path) -> dict[str, HeadFactors | None] | None:
    """``{layer: initial factors, or None when the layer started at zero}`` from :data:`INIT_FILE`, or
    ``None`` when the run dir has no such file."""
    from safetensors import safe_open

    path = Path(run_dir) / INIT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as fh:
        layers = json.loads(fh.metadata()["layers"])
        stored: dict[str, dict[str, torch.Tensor]] = {}
        for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
            name, part = key.rsplit("::", 1)
            stored.setdefault(name, {})[part] = fh.get_tensor(key).double()
    out: dict[str, HeadFactors | None] = {}
    for name, quantity in layers.items():
        t = stored.get(name)
        out[name] = None if t is None else HeadFactors(quantity, t["up"], t.get("down"), t.get("shared_down"))
    return out


# ---------------------------------------------------------------- the diagnostic


def head_similarity(model: nn.Module, init: dict[str, HeadFactors | None] | None = None) -> dict | None:
    """Inter-head similarity of every multi-head adapter layer of ``model``.

    ``init``: the initial contributions (:func:`load_initial_heads`; a layer mapped to ``None`` started at
    zero); without it the increments are ``None``. Returns ``None`` when no layer has 2 or more heads, else
    ``{"quantity" (shared by all layers, or "mixed"), "mean", "mean_increment", "mean_delta_w", "init"
    ("saved" | "unknown"), "layers": {name: {"layer", "module", "quantity", "similarity", "increment",
    "delta_w", "heads"}}, "by_module": {kind: {"layer": [...], "similarity": [...], "increment": [...],
    "delta_w": [...]}}}``."""
    layers: dict[str, dict] = {}
    for name, layer in adapter_layers(model).items():
        f = head_factors(layer)
        if f is None:
            continue
        sim = mean_offdiagonal(contribution_cosine(f))
        inc = None
        if init is not None and name in init:
            f0 = init[name]
            inc = sim if f0 is None else mean_offdiagonal(contribution_cosine(f, f0))
        idx, kind = split_name(name)
        layers[name] = {
            "layer": idx,
            "module": kind,
            "quantity": f.quantity,
            "similarity": sim,
            "increment": inc,
            "delta_w": mean_offdiagonal(delta_w_cosine(f)),
            "heads": f.n,
        }
    if not layers:
        return None
    by_module: dict[str, dict[str, list]] = {}
    for v in layers.values():
        entry = by_module.setdefault(
            v["module"], {"layer": [], "similarity": [], "increment": [], "delta_w": []}
        )
        for k in entry:
            entry[k].append(v[k])
    quantities = {v["quantity"] for v in layers.values()}

    def mean(key: str) -> float | None:
        return nanmean([v[key] for v in layers.values() if v[key] is not None])

    return {
        "quantity": quantities.pop() if len(quantities) == 1 else "mixed",
        "mean": mean("similarity"),
        "mean_increment": mean("increment"),
        "mean_delta_w": mean("delta_w"),
        "init": "unknown" if init is None else "saved",
        "layers": layers,
        "by_module": by_module,
    }
