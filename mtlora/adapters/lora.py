"""Plain LoRA (Hu et al., 2021).

.. math::
    h = W_0 x + s \\, B A \\, \\mathrm{drop}(x), \\qquad
    A \\in \\mathbb{R}^{r \\times d_{in}},\\; B \\in \\mathbb{R}^{d_{out} \\times r},\\;
    s = \\alpha / r \\;(\\text{or } \\alpha/\\sqrt{r} \\text{ with rank-stabilised scaling})

Init as in peft: ``A ~ kaiming_uniform(a=√5)`` (= U(-1/√d_in, 1/√d_in)), ``B = 0``, so the adapted
model starts equal to the base model. Merged weight: ``W = W0 + s·BA``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.methods.lora import LORA


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraLinear(AdapterLayer):
    mergeable: ClassVar[bool] = True
    spec = LORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__(base_layer, name, context)
        self.rank = rank
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # down-projection, (..., r)
        self.capture("lora_A", z)
        return F.linear(z, self.lora_B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under peft's key suffixes (``mtlora.export format=peft``)."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
