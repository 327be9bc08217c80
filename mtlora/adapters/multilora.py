"""MultiLoRA (Wang et al., 2023; ``docs/methods.md`` §8): parallel LoRAs with learnable output scalings.

.. math::
    h = W_0 x + s \\sum_{i=1}^{n} v_i \\odot \\big(B_i A_i\\, \\mathrm{drop}(x)\\big), \\qquad
    A_i \\in \\mathbb{R}^{r \\times d_{in}},\\; B_i \\in \\mathbb{R}^{d_{out} \\times r},\\;
    v_i \\in \\mathbb{R}^{d_{out}}

* ``n = num_loras`` LoRAs of rank ``r`` each; ``s = α/r`` (``α/√r`` with ``use_rslora``);
* init [code MTL-LoRA multilora.py, per methods.md]: ``A_i`` **and** ``B_i`` kaiming-uniform(a=√5) (both
  non-zero; for ``B_i`` that is ``U(-1/√r, 1/√r)``), the scaling vectors ``v_i = 0`` (``lora_scale``), so the
  adapted model starts equal to the base model and the first steps train only ``v``;
* one dropout mask of ``x`` shared by the ``n`` LoRAs (``drop(x)`` in the equation).

Storage and batching: the ``A_i`` are the row blocks of one ``lora_A ∈ R^{n·r×d_in}`` (LoRA ``i`` = rows
``[i·r, (i+1)·r)``), ``lora_B`` is ``(n, d_out, r)`` and ``lora_scale`` is ``(n, d_out)``. The scaling is folded
into the up-projections, ``B'_i = diag(v_i) B_i``, laid side by side as ``(d_out, n·r)`` and applied to the
stacked down-projection ``z = A drop(x) ∈ R^{…×n·r}`` in one matmul (no loop over the LoRAs).

Mergeable: ``ΔW = s Σ_i diag(v_i) B_i A_i``. ``capture("lora_A")`` stores the stacked ``z``.
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
from mtlora.adapters.methods.parallel import MULTILORA


class MultiLoraLinear(AdapterLayer):
    mergeable: ClassVar[bool] = True
    method: ClassVar[str] = MULTILORA.name
    spec = MULTILORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        num_loras: int | None = None,
    ) -> None:
        super().__init__(base_layer, name, context)
        num_loras = self.resolve_knobs(name, rank=rank, num_loras=num_loras)["num_loras"]
        self.rank = rank
        self.num_loras = num_loras
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, f32 = base_layer.weight.device, torch.float32
        n, d_in, d_out = num_loras, self.in_features, self.out_features
        self.lora_A = nn.Parameter(torch.empty(n * rank, d_in, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.empty(n, d_out, rank, device=dev, dtype=f32))
        self.lora_scale = nn.Parameter(torch.zeros(n, d_out, device=dev, dtype=f32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        # fan_in = d_in for every row block of A, fan_in = r for every B_i (viewed as (n·d_out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_B.view(-1, self.rank), a=math.sqrt(5))
        nn.init.zeros_(self.lora_scale)

    def up_heads(self) -> torch.Tensor:
        return self.lora_B

    def scaled_up(self, dtype: torch.dtype) -> torch.Tensor:
        """``[diag(v_1) B_1, …, diag(v_n) B_n]`` as one ``(d_out, n·r)`` matrix."""
        n, d_out, r = self.lora_B.shape
        b = self.lora_scale.unsqueeze(-1) * self.lora_B  # (n, d_out, r)
        return b.permute(1, 0, 2).reshape(d_out, n * r).to(dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., n·r): all LoRAs at once
        self.capture("lora_A", z)
        return F.linear(z, self.scaled_up(z.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.scaled_up(torch.float32) @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, num_loras={self.num_loras}, scaling={self.scaling:g}, dropout={self.dropout_p}"
