"""Shared-A multi-head LoRA: HydraLoRA, R-LoRA and M-LoRA (``docs/methods.md`` §1-§3, §11, §12).

One down-projection ``A ∈ R^{r×d_in}`` is shared by ``N`` up-projection heads ``B_i ∈ R^{d_out×r}``:

.. math::
    h = W_0 x + s \\Big( \\sum_{i=1}^{N} c_i(x)\\, B_i\\, z_i(x) \\;-\\; \\bar B_0 A_0 x \\Big)

* ``z_i(x)``, by ``dropout_place``: ``A drop_i(x)`` (``input_per_head``: an independent mask of the
  d_in input per head, official HydraLoRA), ``A drop(x)`` (``input_shared``: one mask for all heads,
  R-LoRA's re-implementation of HydraLoRA) or ``drop_i(A x)`` (``A_out_per_head``: R-LoRA's
  multi-head dropout on the r-dim output of A, an independent mask per head).
* ``c_i(x)``: the router ``ω(x) = softmax(W_r x)`` (bias-free ``W_r ∈ R^{N×d_in}`` on the un-dropped
  token input, logits and softmax in fp32 — HydraLoRA, R-LoRA), or a constant ``1`` (``combine=sum``) /
  ``1/N`` (``combine=mean``) without a router (M-LoRA).
* ``s = α/r`` (``α/√r`` with ``use_rslora``).
* ``B̄_0 A_0``: R-LoRA's initial-output offset (``init=rlora`` with ``init_offset``), the frozen init values
  ``A_0`` and ``B̄_0 = (1/N) Σ_i B_i(0)`` (router methods; exact only while the router is uniform) or
  ``c Σ_i B_i(0)`` (M-LoRA; exact). The code of R-LoRA subtracts this from ``W0`` itself; here it is kept
  as two low-rank **buffers** (saved with the adapter weights) so that the frozen base weights stay
  untouched (``base_model/`` fingerprints and exports remain the real base model).

Init (``init``): ``zero_B`` — ``A`` kaiming-uniform(a=√5), every ``B_i = 0`` (HydraLoRA); ``rlora`` —
R-LoRA's multi-head random init: ``A ~ N(0, 1/max(r, d_in))``, each ``B_i ~ N(0, 1/max(d_out, r))`` drawn
independently, then the "stable" scaling with ``γ = stable_gamma`` (``init_scale``):

* ``code`` (reinit.py as released; the default): factor ``f = r^{1/4}/√γ``, ``A`` times ``f^N`` and ``B_i``
  times ``f^{N-i}`` (``i = 0..N-1``; the scaling sits inside the head loop);
* ``paper`` (v1 Table 1): ``A`` and every ``B_i`` times ``d_out^{1/4}/√γ`` once;
* ``none``: the plain "unit" Gaussians.

The router ``W_r`` is kaiming-uniform(a=√5) in every case. Adapter tensors are fp32 (the project
convention; R-LoRA's code casts them to bf16).

Heads are one parameter ``lora_B`` of shape ``(N, d_out, r)`` and are computed in one matmul: the per-head
inputs ``c_i z_i`` are laid side by side as a ``(…, N·r)`` tensor and multiplied by ``B`` viewed as
``(d_out, N·r)`` (no Python loop over heads, no ``(…, N, d_out)`` intermediate).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.multihead import HYDRALORA, MLORA, RLORA


class MultiHeadLoraLinear(AdapterLayer):
    """Shared ``A``, ``N`` batched ``B`` heads; a token router (``routed``) or a fixed sum/mean."""

    #: whether the heads are weighted by a per-token softmax router (then the layer cannot merge; the
    #: spec's ``token_routed``)
    routed: ClassVar[bool] = HYDRALORA.token_routed
    #: ``adapter.method`` of the class (for messages)
    method: ClassVar[str] = "multihead"
    spec = HYDRALORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        num_heads: int,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dropout_place: str | None = None,
        init: str | None = None,
        init_scale: str | None = None,
        stable_gamma: float | None = None,
        init_offset: bool | None = None,
        combine: str | None = None,
    ) -> None:
        """Knobs left ``None`` take the spec's default (:mod:`mtlora.adapters.methods.multihead`)."""
        super().__init__(base_layer, name, context)
        knobs = dict(
            rank=rank,
            num_heads=num_heads,
            dropout_place=dropout_place,
            init=init,
            init_scale=init_scale,
            stable_gamma=stable_gamma,
            init_offset=init_offset,
        )
        if not self.routed:
            knobs["combine"] = combine
        v = self.resolve_knobs(name, **knobs)
        dropout_place, init, init_scale = v["dropout_place"], v["init"], v["init_scale"]
        stable_gamma, init_offset, combine = v["stable_gamma"], v["init_offset"], v.get("combine")
        self.rank = rank
        self.num_heads = num_heads
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_place = dropout_place
        self.init = init
        self.init_scale = init_scale
        self.stable_gamma = float(stable_gamma)
        self.combine = combine if not self.routed else "router"
        # the constant head weight without a router: 1 (sum) or 1/N (mean)
        self.head_coef = 1.0 if combine == "sum" or self.routed else 1.0 / num_heads
        dev = base_layer.weight.device
        d_in, d_out = self.in_features, self.out_features
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, d_out, rank, device=dev, dtype=torch.float32))
        if self.routed:
            self.lora_router = nn.Parameter(torch.empty(num_heads, d_in, device=dev, dtype=torch.float32))
        self.has_offset = init == "rlora" and bool(init_offset)
        if self.has_offset:
            self.register_buffer("lora_offset_A", torch.zeros(rank, d_in, device=dev, dtype=torch.float32))
            self.register_buffer("lora_offset_B", torch.zeros(d_out, rank, device=dev, dtype=torch.float32))
        self.reset_parameters()

    # ---------------------------------------------------------------- init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        if self.routed:
            nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        if self.init == "zero_B":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            self._rlora_init()
        if self.has_offset:
            self.lora_offset_A.copy_(self.lora_A)
            coef = 1.0 / self.num_heads if self.routed else self.head_coef
            self.lora_offset_B.copy_(self.lora_B.sum(0) * coef)

    def _rlora_init(self) -> None:
        """R-LoRA multi-head random init (methods.md §2, steps 1-2); the offset is set by the caller.

        Draw order as the released ``reinit.py``: ``A`` first, then ``B_0 … B_{N-1}``, one draw per head.
        ``code`` scales inside the head loop as that code does: after drawing ``B_i``, ``A`` and the heads
        drawn so far are multiplied by ``f = r^{1/4}/√γ`` (so ``A·f^N``, ``B_i·f^{N-i}``), one fp32
        multiplication at a time, which keeps the result bit-identical to the code's.
        """
        r, n = self.rank, self.num_heads
        d_in, d_out = self.in_features, self.out_features
        gamma = self.stable_gamma
        f = r**0.25 / math.sqrt(gamma) if self.init_scale == "code" else d_out**0.25 / math.sqrt(gamma)
        nn.init.normal_(self.lora_A, 0.0, 1.0 / math.sqrt(max(r, d_in)))
        for i in range(n):  # every head its own draw (breaks the head symmetry)
            nn.init.normal_(self.lora_B[i], 0.0, 1.0 / math.sqrt(max(d_out, r)))
            if self.init_scale == "code":
                self.lora_A.mul_(f)
                self.lora_B[: i + 1].mul_(f)
        if self.init_scale == "paper":
            self.lora_A.mul_(f)
            self.lora_B.mul_(f)

    # ---------------------------------------------------------------- forward

    def up_heads(self) -> torch.Tensor:
        return self.lora_B

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token head weights ``softmax(W_r x)`` of shape ``(..., N)``, always fp32 (autocast off)."""
        if not self.routed:
            raise TypeError(f"{type(self).__name__} has no router")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.softmax(F.linear(x.float(), self.lora_router.float()), dim=-1)

    def _head_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``z`` (``(..., r)`` shared by the heads, or ``(..., N, r)`` one per head) and whether per head."""
        a = self.lora_A.to(x.dtype)
        dropping = self.training and self.dropout_p > 0
        n = self.num_heads
        if self.dropout_place == "input_per_head" and dropping:
            xs = self.lora_dropout(x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]))
            if self.context.capture:
                self.capture("lora_A", F.linear(x, a))
            return F.linear(xs, a), True
        z = F.linear(self.lora_dropout(x) if self.dropout_place == "input_shared" else x, a)
        self.capture("lora_A", z)
        if self.dropout_place == "A_out_per_head" and dropping:
            return self.lora_dropout(z.unsqueeze(-2).expand(*z.shape[:-1], n, z.shape[-1])), True
        return z, False

    def _heads_as_one_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """``B`` as ``(d_out, N·r)``: column ``i·r + j`` is column ``j`` of head ``i``."""
        n, d_out, r = self.lora_B.shape
        return self.lora_B.to(dtype).permute(1, 0, 2).reshape(d_out, n * r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, per_head = self._head_inputs(x)
        if self.routed:
            w = self.router_weights(x).to(z.dtype).unsqueeze(-1)  # (..., N, 1)
            u = w * z if per_head else w * z.unsqueeze(-2)  # (..., N, r)
            out = F.linear(u.flatten(-2), self._heads_as_one_matrix(z.dtype))
        elif per_head:
            out = F.linear(z.flatten(-2), self._heads_as_one_matrix(z.dtype)) * self.head_coef
        else:  # Σ_i B_i z = (Σ_i B_i) z
            out = F.linear(z, self.lora_B.sum(0).to(z.dtype)) * self.head_coef
        if self.has_offset:
            off = F.linear(F.linear(x, self.lora_offset_A.to(x.dtype)), self.lora_offset_B.to(x.dtype))
            out = out - off.to(out.dtype)
        return out * self.scaling

    def delta_weight(self) -> torch.Tensor:
        if self.routed:
            raise TypeError(
                f"{type(self).__name__} (adapter.method={self.method}) weights its heads with a per-token "
                f"softmax router on the layer input, so its update depends on the token and cannot be "
                f"merged into the base weight; run the model unmerged"
            )
        dw = (self.lora_B.sum(0) * self.head_coef) @ self.lora_A
        if self.has_offset:
            dw = dw - self.lora_offset_B @ self.lora_offset_A
        return dw * self.scaling

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_heads={self.num_heads}, scaling={self.scaling:g}, combine={self.combine}, "
            f"dropout={self.dropout_p}@{self.dropout_place}, init={self.init}"
            + (f"/{self.init_scale}, offset={self.has_offset}" if self.init == "rlora" else "")
        )


class HydraLoraLinear(MultiHeadLoraLinear):
    """HydraLoRA (methods.md §1): token router on x, ``B_i = 0`` init, dropout on the input (per head by
    default, as the official code). Not mergeable."""

    method = HYDRALORA.name
    spec = HYDRALORA
    routed = HYDRALORA.token_routed


class RLoraLinear(HydraLoraLinear):
    """R-LoRA (methods.md §2): HydraLoRA + multi-head dropout on A's output + multi-head random init with
    the initial-output offset. Not mergeable."""

    method = RLORA.name
    spec = RLORA
    routed = RLORA.token_routed


class MLoraLinear(MultiHeadLoraLinear):
    """M-LoRA (methods.md §3): R-LoRA without the router, heads summed (or averaged). Mergeable."""

    mergeable = True
    method = MLORA.name
    spec = MLORA
    routed = MLORA.token_routed

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """One LoRA ``B'A' = ΔW``: ``A' = [A; A_0]``, ``B' = s·[c Σ_i B_i, −B̄_0]`` (the offset as ``r`` more
        rank when there is one), peft's scaling 1 (``mtlora.export``)."""
        a, b = self.lora_A.float(), self.lora_B.float().sum(0) * self.head_coef
        if self.has_offset:
            a = torch.cat([a, self.lora_offset_A.float()], dim=0)
            b = torch.cat([b, -self.lora_offset_B.float()], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b * self.scaling}
