"""MoLoRA / "LoRA MoE" (Zadouri et al., 2023; HydraLoRA's "LoRAMoE" baseline; ``docs/methods.md`` §8).

``N = num_experts`` full LoRA experts of rank ``r`` each, mixed per token by a router on the input:

.. math::
    h = W_0 x + s \\sum_{i=1}^{N} \\omega_i(x)\\, B_i A_i\\, \\mathrm{drop}(x), \\qquad
    p(x) = \\mathrm{softmax}(W_g x), \\qquad s = \\alpha / r \\;(\\alpha/\\sqrt{r})

* router ``W_g ∈ R^{N×d_in}`` (``lora_router``): bias-free, on the **un-dropped** token input, logits and
  softmax in fp32 with autocast off, kaiming-uniform(a=√5);
* ``ω = p`` (dense soft routing, the default: ``top_k = null``). With ``top_k = k`` only the ``k`` largest
  ``p_i`` of each token are kept and **renormalised to sum to 1** (``ω_i = p_i / Σ_{j∈top-k} p_j``, ``0`` for
  the others); ``top_k = N`` equals dense routing;
* optional balance loss (``balance_weight``, default 0 = off), in training only: with ``p̄ = mean_tokens p(x)``
  (the mean dense routing probability of each expert over every token of the batch — padding included, the
  loss does not look at the attention mask), ``cv² = Var(p̄) / (Mean(p̄)² + 1e-10)`` (``Var`` with Bessel's
  correction, as ``torch.var``; no loss for ``N = 1``), added as
  ``aux_losses["<layer>.balance"] = balance_weight · cv² / context.num_layers`` so the total over the model is
  ``balance_weight`` times the mean over layers;
* init: every ``A_i`` kaiming-uniform(a=√5), every ``B_i = 0`` (starts equal to the base model); one
  dropout mask of ``x`` shared by the experts.

Storage and batching: the ``A_i`` are the row blocks of ``lora_A ∈ R^{N·r×d_in}`` and ``lora_B`` is
``(N, d_out, r)``; ``z = A drop(x) ∈ R^{…×N·r}`` (all experts in one matmul, stored by
``capture("lora_A")``), weighted by ``ω`` block-wise and multiplied by ``B`` viewed as ``(d_out, N·r)`` — no
loop over experts (dense compute also with ``top_k``: the dropped experts get weight 0).

Not mergeable: the router weights depend on the token.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.balance import cv_squared
from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.parallel import MOLORA


class MoLoraLinear(AdapterLayer):
    mergeable: ClassVar[bool] = False
    method: ClassVar[str] = MOLORA.name
    spec = MOLORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        num_experts: int | None = None,
        top_k: int | None = None,
        balance_weight: float | None = None,
    ) -> None:
        """Knobs left ``None`` take the spec's default (:mod:`mtlora.adapters.methods.parallel`; ``top_k`` None =
        dense)."""
        super().__init__(base_layer, name, context)
        v = self.resolve_knobs(
            name, rank=rank, num_experts=num_experts, top_k=top_k, balance_weight=balance_weight
        )
        num_experts, top_k, balance_weight = v["num_experts"], v["top_k"], v["balance_weight"]
        self.rank = rank
        self.num_experts = num_experts
        self.top_k = top_k
        self.balance_weight = float(balance_weight)
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, f32 = base_layer.weight.device, torch.float32
        n, d_in, d_out = num_experts, self.in_features, self.out_features
        self.lora_A = nn.Parameter(torch.empty(n * rank, d_in, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, rank, device=dev, dtype=f32))
        self.lora_router = nn.Parameter(torch.empty(n, d_in, device=dev, dtype=f32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = d_in for every expert's block
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))

    # ---------------------------------------------------------------- routing

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense routing probabilities ``softmax(W_g x)``, ``(..., N)``, always fp32 (autocast off)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.softmax(F.linear(x.float(), self.lora_router.float()), dim=-1)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """``ω`` from the dense probabilities: themselves, or the top-k kept and renormalised to sum 1."""
        if self.top_k is None or self.top_k >= self.num_experts:
            return probs
        top, idx = probs.topk(self.top_k, dim=-1)
        kept = torch.zeros_like(probs).scatter(-1, idx, top)
        return kept / kept.sum(-1, keepdim=True)

    def balance_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """``cv²`` of the mean routing probability per expert over all tokens of ``probs`` (fp32 scalar)."""
        return cv_squared(probs.reshape(-1, self.num_experts).mean(0))

    def up_heads(self) -> torch.Tensor:
        return self.lora_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router_weights(x)
        if self.training and self.balance_weight > 0 and self.num_experts > 1:
            layers = max(self.context.num_layers, 1)
            self.add_aux_loss("balance", self.balance_weight * self.balance_loss(probs) / layers)
        w = self.expert_weights(probs)
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., N·r): every expert at once
        self.capture("lora_A", z)
        n, d_out, r = self.lora_B.shape
        # ω_i A_i drop(x) of every expert, side by side: (..., N·r)
        u = (z.unflatten(-1, (n, r)) * w.to(z.dtype).unsqueeze(-1)).flatten(-2)
        b = self.lora_B.to(z.dtype).permute(1, 0, 2).reshape(d_out, n * r)
        return F.linear(u, b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} (adapter.method={self.method}) weights its experts with a per-token "
            f"router on the layer input, so its update depends on the token and cannot be merged into the "
            f"base weight; run the model unmerged"
        )

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_experts={self.num_experts}, top_k={self.top_k or 'dense'}, "
            f"balance_weight={self.balance_weight:g}, scaling={self.scaling:g}, dropout={self.dropout_p}"
        )
