"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024; ``docs/methods.md`` §8).

.. math::
    W' = m \\odot \\frac{W_0 + s\\,BA}{\\lVert W_0 + s\\,BA \\rVert_{row}}, \\qquad
    h = W' x + b

``‖·‖_row`` is the L2 norm of each output row of the ``(d_out, d_in)`` weight, i.e. over the input
dimension (the paper's "column-wise" norm of the ``d_in × d_out`` matrix; peft's ``dim=1`` norm of the
nn.Linear weight). ``m ∈ R^{d_out}`` (``lora_magnitude``, trainable, fp32) starts at ``‖W0‖_row``; ``A`` is
kaiming-uniform(a=√5) and ``B = 0``, so the layer starts equal to the base. The bias is not rescaled.

Forward, as the official DoRA code and peft (one dropout mask for both terms, ``c = m / ‖W0 + sBA‖_row``):

.. math::
    h = W_0 x + b + (c - 1) \\odot W_0\\,\\mathrm{drop}(x) + c \\odot s\\,BA\\,\\mathrm{drop}(x)

which is ``W' x + b`` whenever dropout is off (eval). ``detach_norm`` (default true: the paper's §4.3
memory-saving variant, the official code and peft) treats ``‖W0 + sBA‖_row`` as a constant in backward;
the forward value is the same either way.

Mergeable: ``ΔW = W' − W0``. The update depends on ``W0`` itself, so :meth:`merge` keeps the exact ``ΔW``
it added (in the weight's dtype) and :meth:`unmerge` subtracts that same tensor; while merged,
:meth:`delta_weight` recovers ``W0`` as ``W − ΔW_merged``.
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
from mtlora.adapters.methods.dora import DORA


class DoraLinear(AdapterLayer):
    mergeable: ClassVar[bool] = True
    method: ClassVar[str] = DORA.name
    spec = DORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        detach_norm: bool | None = None,
    ) -> None:
        """``detach_norm`` None takes the spec's default (:mod:`mtlora.adapters.methods.dora`)."""
        super().__init__(base_layer, name, context)
        detach_norm = self.resolve_knobs(name, rank=rank, detach_norm=detach_norm)["detach_norm"]
        self.rank = rank
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.detach_norm = bool(detach_norm)
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=dev, dtype=torch.float32))
        # the ΔW folded into the base weight by merge() (None when unmerged); not saved with the adapter
        self._merged_delta: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.lora_magnitude.copy_(self._base_weight().float().norm(p=2, dim=1))

    # ---------------------------------------------------------------- weights

    def _base_weight(self) -> torch.Tensor:
        """``W0`` (recovered from the merged weight while merged)."""
        w = self.base_layer.weight
        if self.merged and self._merged_delta is not None:
            return w - self._merged_delta
        return w

    def _norm_scale(self) -> torch.Tensor:
        """``c = m / ‖W0 + sBA‖_row`` in fp32, shape ``(d_out,)``."""
        w0 = self._base_weight().detach().float()
        w = w0 + self.scaling * (self.lora_B @ self.lora_A)
        norm = w.norm(p=2, dim=1)
        if self.detach_norm:
            norm = norm.detach()
        return self.lora_magnitude / norm

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = W' − W0`` (fp32)."""
        w0 = self._base_weight().detach().float()
        w = w0 + self.scaling * (self.lora_B @ self.lora_A)
        return (self.lora_magnitude / w.norm(p=2, dim=1)).unsqueeze(1) * w - w0

    # ---------------------------------------------------------------- forward

    def _delta(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        c = self._norm_scale()
        xd = self.lora_dropout(x)
        if base_out is None or (self.training and self.dropout_p > 0):
            base_nobias = F.linear(xd, self.base_layer.weight.to(x.dtype))  # W0 drop(x)
        else:  # no dropout: W0 x is the base output without its bias
            bias = self.base_layer.bias
            base_nobias = base_out if bias is None else base_out - bias
        z = F.linear(xd, self.lora_A.to(x.dtype))
        self.capture("lora_A", z)
        lora = F.linear(z, self.lora_B.to(x.dtype)) * self.scaling
        c = c.to(lora.dtype)
        return (c - 1) * base_nobias.to(lora.dtype) + c * lora

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._delta(x, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        return out + self._delta(x, out).to(out.dtype)

    # ---------------------------------------------------------------- merge

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base_layer.weight
        dw = self.delta_weight().to(w.dtype)
        w.add_(dw)
        self._merged_delta = dw
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.sub_(self._merged_delta)
        self._merged_delta = None
        self.merged = False

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA ``A``, ``B`` and the magnitude ``m`` under peft's key suffixes (``use_dora=True``)."""
        return {
            "lora_A.weight": self.lora_A,
            "lora_B.weight": self.lora_B,
            "lora_magnitude_vector": self.lora_magnitude,
        }

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout_p}, detach_norm={self.detach_norm}"
