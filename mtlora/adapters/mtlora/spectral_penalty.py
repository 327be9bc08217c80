"""mtLoRA's spectral-aware regulariser (``adapter.spectral``) on the expert up-matrices ``B_i`` (``docs/methods.md`` §6(c), §12.6).

Two formulations (``adapter.spectral.mode``):

* ``self_gram`` [code, default] — per expert matrix ``B ∈ R^{d_out×r}`` (:func:`self_gram_penalty`):
  ``G = BᵀB``; singular values ``σ`` of ``B`` (detached); ``w_k = exp(−σ_k / (mean σ + 1e-8))``;
  ``c = ‖B‖_F/√r + 1e-8`` (detached); ``L_B = Σ_{k,l} (w_k w_l (G − c² I)_{kl})²``;
  ``L_spec = mean_B L_B`` over the (sampled) matrices of all adapted layers.
* ``cross_expert`` [paper-note; our concrete reading] — per layer with experts ``B_1..B_N``
  (:func:`cross_expert_penalty`): ``B_i = U_i diag(σ_i) V_iᵀ`` from a **detached** SVD,
  ``w_i = exp(−σ_i / (mean σ_i + 1e-8))``, ``B'_i = B_i V_i diag(w_i) V_iᵀ`` (= ``U_i diag(w_i⊙σ_i) V_iᵀ``
  in value; the gradient flows through ``B_i`` only), ``L_layer = Σ_{i<j} ‖B'_iᵀ B'_j‖²_F``;
  ``L_spec = mean`` over the (sampled) layers. Low-σ directions (``w ≈ 1``) of different experts are
  pushed apart, high-σ ones (``w ≈ 0``) are left alone.
* ``none`` — no regulariser.

The term added to the loss is ``λ · L_spec`` (``adapter.spectral.lambda``), computed in fp32 with autocast
off. When there are more than ``max_matrices`` matrices, a random subset is used, drawn by
``random.Random(step)`` (the same on every process and after a resume): ``max_matrices`` matrices for
``self_gram`` (as the code), ``max(1, max_matrices // N)`` whole layers for ``cross_expert``.

**Schedule.** The regulariser is a ``(step, steps_per_epoch) -> Tensor | None`` callable in
``context.regularizers``; the loop calls it once per optimizer step with the 0-based step index and adds
``value / GA`` to the step's first micro-batch [code]: the official trainer adds ``λ · L_spec`` to one
micro-batch loss and the HF Trainer divides every micro-batch loss by GA, so the step's gradient holds
``(λ / GA) · ∇L_spec`` (at GA = 1 this is ``λ``). It fires

* with ``every_steps = k``: at steps where ``(step + 1) % k == 0`` (``k−1, 2k−1, …``). The official
  trainer fires when ``global_step − last ≥ k`` with ``last`` starting at ``−1`` and set to the step each
  time it fires, which is exactly this set, so no state needs saving: a resumed run fires at the same steps;
* with ``every_steps = null``: once per epoch, at its first step (``step % steps_per_epoch == 0``), as the
  code's epoch mode (``int(epoch) − last_epoch ≥ 1``, ``last_epoch = −1``);

and returns ``None`` at every other step. As in the code, it is evaluated on a single micro-batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from mtlora.adapters.base import check_arg, is_int
from mtlora.adapters.methods.mtlora import MTLORA, SPECTRAL_MODES

_EPS = 1e-8
#: the spec's defaults of ``adapter.spectral.<key>``
_DEFAULTS = {k.removeprefix("spectral."): v for k, v in MTLORA.defaults.items() if k.startswith("spectral.")}


def spectral_weights(sigma: torch.Tensor) -> torch.Tensor:
    """``w_k = exp(−σ_k / (mean_k σ + 1e-8))`` over the last dim."""
    return torch.exp(-sigma / (sigma.mean(dim=-1, keepdim=True) + _EPS))


def self_gram_penalty(B: torch.Tensor) -> torch.Tensor:
    """Spectral-weighted self-orthogonality of ``B`` (``(..., d_out, r)``), one value per matrix (``(...)``).

    .. math::
        L_B = \\sum_{k,l=1}^{r} \\big( w_k\\, w_l\\, (B^\\top B - c^2 I)_{kl} \\big)^2, \\quad
        w_k = e^{-\\sigma_k / (\\bar\\sigma + 10^{-8})}, \\quad c = \\lVert B \\rVert_F / \\sqrt{r} + 10^{-8}

    ``σ`` (descending) and ``c`` are detached; ``w_k`` multiplies row/column ``k`` of the Gram matrix (column
    order of ``B``, as the released code). When ``d_out < r`` the missing singular values count as 0."""
    B = B.float()
    r = B.shape[-1]
    with torch.no_grad():
        sigma = torch.linalg.svdvals(B)
        if sigma.shape[-1] < r:
            sigma = torch.nn.functional.pad(sigma, (0, r - sigma.shape[-1]))
        w = spectral_weights(sigma)
        c = torch.linalg.matrix_norm(B) / math.sqrt(r) + _EPS
    gram = B.mT @ B
    eye = torch.eye(r, device=B.device, dtype=B.dtype)
    diff = (gram - (c * c)[..., None, None] * eye) * w[..., :, None] * w[..., None, :]
    return diff.square().sum(dim=(-2, -1))


def cross_expert_penalty(Bs: torch.Tensor) -> torch.Tensor:
    """Spectral-weighted cross-expert overlap of ``Bs`` (``(..., N, d_out, r)``), one value per stack.

    .. math::
        L = \\sum_{i<j} \\lVert B_i'^\\top B_j' \\rVert_F^2, \\quad
        B_i' = B_i V_i\\, \\mathrm{diag}(w_i)\\, V_i^\\top, \\quad B_i = U_i \\mathrm{diag}(\\sigma_i) V_i^\\top, \\quad
        w_{i,k} = e^{-\\sigma_{i,k} / (\\bar\\sigma_i + 10^{-8})}

    ``V_i`` and ``w_i`` come from a detached SVD, so the gradient flows through ``B_i`` only."""
    B = Bs.float()
    n, r = B.shape[-3], B.shape[-1]
    with torch.no_grad():
        _, sigma, vh = torch.linalg.svd(B, full_matrices=False)
        proj = vh.mT @ (spectral_weights(sigma)[..., :, None] * vh)  # V diag(w) Vᵀ, (..., N, r, r)
    bp = B @ proj  # B'_i, (..., N, d_out, r)
    m = bp.movedim(-3, -2).flatten(-2)  # (..., d_out, N·r)
    blocks = (m.mT @ m).unflatten(-1, (n, r)).unflatten(-3, (n, r))  # (..., N, r, N, r): B'_iᵀ B'_j
    sq = blocks.square().sum(dim=(-3, -1))  # (..., N, N): ‖B'_iᵀ B'_j‖²_F
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=B.device), diagonal=1)
    return sq[..., upper].sum(dim=-1)


class SpectralRegularizer:
    """``λ · L_spec`` over the ``lora_B`` (``(N, d_out, r)``) of ``layers`` on the schedule of the module doc."""

    def __init__(
        self,
        layers: Sequence[nn.Module] = (),
        mode: str = _DEFAULTS["mode"],
        lam: float = _DEFAULTS["lambda"],
        every_steps: int | None = _DEFAULTS["every_steps"],
        max_matrices: int = _DEFAULTS["max_matrices"],
        name: str = "mtlora",
    ) -> None:
        check_arg(name, "spectral.mode", mode, mode in SPECTRAL_MODES, f"one of {SPECTRAL_MODES}")
        ok = isinstance(lam, int | float) and not isinstance(lam, bool) and lam >= 0
        check_arg(name, "spectral.lambda", lam, ok, "a number >= 0")
        check_arg(
            name,
            "spectral.every_steps",
            every_steps,
            every_steps is None or is_int(every_steps, 1),
            "null or >= 1",
        )
        check_arg(name, "spectral.max_matrices", max_matrices, is_int(max_matrices, 1), "an integer >= 1")
        self.layers = list(layers)
        self.mode = mode
        self.lam = float(lam)
        self.every_steps = every_steps
        self.max_matrices = max_matrices

    @classmethod
    def from_config(cls, spectral_cfg, layers: Sequence[nn.Module] = ()) -> SpectralRegularizer | None:
        """From ``adapter.spectral`` (a mapping or null), checked; ``None`` when it is off (null, mode
        ``none`` or λ = 0). ``layers`` may be set later (``.layers``), once the adapters are in place."""
        if spectral_cfg is None:
            return None
        reg = cls(
            layers,
            mode=spectral_cfg.get("mode", _DEFAULTS["mode"]),
            lam=spectral_cfg.get("lambda", _DEFAULTS["lambda"]),
            every_steps=spectral_cfg.get("every_steps", _DEFAULTS["every_steps"]),
            max_matrices=spectral_cfg.get("max_matrices", _DEFAULTS["max_matrices"]),
        )
        return None if reg.mode == "none" or reg.lam == 0 else reg

    def fires(self, step: int, steps_per_epoch: int) -> bool:
        if self.every_steps is None:
            return step % max(int(steps_per_epoch), 1) == 0
        return (step + 1) % self.every_steps == 0

    def __call__(self, step: int, steps_per_epoch: int) -> torch.Tensor | None:
        if not self.fires(step, steps_per_epoch):
            return None
        dev = self.layers[0].lora_B.device
        with torch.autocast(device_type=dev.type, enabled=False):
            return self.lam * self.penalty(step)

    def penalty(self, step: int) -> torch.Tensor:
        """``L_spec`` (without λ) on the subset drawn for ``step``."""
        rng = random.Random(step)
        if self.mode == "cross_expert":
            n = self.layers[0].lora_B.shape[0]
            idx = range(len(self.layers))
            if len(self.layers) * n > self.max_matrices:
                idx = sorted(rng.sample(idx, max(1, self.max_matrices // n)))
            vals = [cross_expert_penalty(self.layers[i].lora_B) for i in idx]
            return torch.stack(vals).mean()
        # self_gram: (layer, expert) pairs, sampled as one flat list, evaluated batched per layer
        pairs = [(li, e) for li, layer in enumerate(self.layers) for e in range(layer.lora_B.shape[0])]
        if len(pairs) > self.max_matrices:
            pairs = sorted(rng.sample(pairs, self.max_matrices))
        by_layer: dict[int, list[int]] = {}
        for li, e in pairs:
            by_layer.setdefault(li, []).append(e)
        total = sum(self_gram_penalty(self.layers[li].lora_B[es]).sum() for li, es in by_layer.items())
        return total / len(pairs)
