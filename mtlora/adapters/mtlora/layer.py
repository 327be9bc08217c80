"""mtLoRA (Tian, Ledent, Sun; ICLR 2026; ``docs/methods.md`` §6), component level, and its routing pieces.

mtLoRA is HydraLoRA (shared ``A``, ``N`` expert heads ``B_i``, per-token router; §1) plus three parts:
fine-grained routing (FGR, here), a balance loss (BLC, here), block-level placement
(:mod:`mtlora.adapters.mtlora.block`) and a spectral-aware regulariser
(:mod:`mtlora.adapters.mtlora.spectral_penalty`).

Component layer (wraps an ``nn.Linear``):

.. math::
    h = W_0 x + s \\sum_{i=1}^{N} \\Pi_i(x) \\odot B_i\\, A\\, \\mathrm{drop}_i(x), \\qquad
    \\pi(x) = \\mathrm{softmax}_{\\text{experts}}\\big(\\mathrm{reshape}_{g\\times N}(W_r x)\\big)

* ``A ∈ R^{r×d_in}`` shared, ``B_i ∈ R^{d_out×r}`` (one parameter ``lora_B`` of shape ``(N, d_out, r)``),
  ``s = α/r`` (``α/√r`` with ``use_rslora``).
* **Dropout [code]** (``dropout_place``, null = as the code): with FGR on (``routing_group_size`` set, or
  ``g > 1``) ``drop_i = drop``, **one** mask shared by all experts (the code's fine-grained branch applies
  ``lora_dropout`` once, before ``A``); without FGR one mask per expert (``input_per_head``, the code's
  scalar-routing branch = HydraLoRA). ``input_shared`` / ``input_per_head`` / ``A_out_per_head`` force one.
* **FGR [code]:** the bias-free router ``W_r ∈ R^{(N·g)×d_in}`` reads the un-dropped token ``x``; its
  ``N·g`` logits are viewed as ``(g, N)`` (logit ``k·N + i`` = group ``k``, expert ``i``), softmax over the
  experts **per group** (fp32, autocast off). ``Π_i(x) ∈ R^{d_out}`` repeats group ``k``'s weight
  ``π_{k,i}`` over the ``group_size = d_out/g`` output dims ``[k·gs, (k+1)·gs)``. ``g = 1`` is HydraLoRA.
  ``g`` comes from ``routing_group_size`` (the code's knob: ``g = d_out / routing_group_size``, must divide)
  or, when that is null, from ``routing_groups`` (``g`` itself; model-independent, e.g. ``g = 2`` is the
  paper's ``routing_group_size=2048`` on a 4096-wide model).
* **BLC [code]:** ``p̄_i`` = mean routing probability of expert ``i`` over batch, tokens and groups;
  ``cv² = Var(p̄) / (Mean(p̄)² + 1e-10)`` (unbiased variance, as ``torch.var`` in the code), computed in
  training mode only, added as ``context.aux_losses["<layer>.balance"] = balance_weight · cv² / L``
  (``L = context.num_layers``) so that the loop's sum over layers is ``balance_weight`` × the mean over
  layers (the paper's ``α``; the same knob and loss as MoLoRA's, :mod:`mtlora.adapters.balance`).
* **BLC gradient** (``blc_grad``): ``true`` [paper] — the term trains the router; ``false`` [code] — the
  value is computed but detached, so it reaches no parameter. The released scripts train with HF gradient
  checkpointing, reentrant in transformers 4.36: decoder layers run their forward under ``no_grad`` and
  the balance value the trainer collects after the forward carries no graph (the recomputation during
  backward builds one, but nothing reads it), so the reported numbers had an inert BLC. Our gradient
  checkpointing is non-reentrant and would make it active, hence this explicit key.

Computation without a loop over experts: ``u = π ⊗ z`` laid out as ``(…, g, N·r)`` and ``B`` viewed as
``(g, group_size, N·r)``; one einsum gives ``(…, g, group_size)`` = ``(…, d_out)``.

Init [code]: ``A``, ``W_r`` kaiming-uniform(a=√5), ``B_i = 0`` (output starts equal to the base). Token
routing ⇒ not mergeable (``merge`` raises ``TypeError``).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.adapters.methods.mtlora import MTLORA
from mtlora.adapters.mtlora.routing import (
    add_balance_loss,
    combine_experts,
    fgr_dropout_place,
    group_router_probs,
    routing_groups_for,
)
from mtlora.adapters.multihead import HydraLoraLinear


class MtLoraLinear(HydraLoraLinear):
    """mtLoRA component layer: HydraLoRA + fine-grained routing + BLC (module doc). Not mergeable.

    Also the registry entry of ``adapter.method=mtlora``: :meth:`place_adapters` puts component layers or
    block-level adapters (``adapter.placement``) into the model and registers the spectral regulariser."""

    method = MTLORA.name
    spec = MTLORA
    routed = MTLORA.token_routed

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
        routing_group_size: int | None = None,
        routing_groups: int | None = None,
        balance_weight: float | None = None,
        blc_grad: bool | None = None,
    ) -> None:
        """Knobs left ``None`` take the spec's default (:mod:`mtlora.adapters.methods.mtlora`)."""
        v = self.resolve_knobs(
            name,
            rank=rank,
            num_heads=num_heads,
            routing_group_size=routing_group_size,
            routing_groups=routing_groups,
            balance_weight=balance_weight,
            blc_grad=blc_grad,
        )
        groups = routing_groups_for(
            name, base_layer.out_features, v["routing_group_size"], v["routing_groups"]
        )
        balance_weight, blc_grad = float(v["balance_weight"]), v["blc_grad"]
        if dropout_place is None:
            dropout_place = fgr_dropout_place(routing_group_size, groups)
        super().__init__(
            base_layer,
            name,
            context,
            rank,
            alpha,
            num_heads,
            dropout=dropout,
            use_rslora=use_rslora,
            dropout_place=dropout_place,
            init=init,
            init_scale=init_scale,
            stable_gamma=stable_gamma,
            init_offset=init_offset,
        )
        self.groups = groups
        self.balance_weight = balance_weight
        self.blc_grad = blc_grad
        if groups > 1:  # N·g router outputs (with g = 1 the layer is exactly HydraLoRA, same init draws)
            dev = self.lora_A.device
            self.lora_router = nn.Parameter(
                torch.empty(num_heads * groups, self.in_features, device=dev, dtype=torch.float32)
            )
            if dev.type != "meta":
                with torch.no_grad():
                    nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))

    @classmethod
    def place_adapters(cls, model: nn.Module, adapter_cfg: DictConfig, context: AdapterContext) -> list[str]:
        """The :func:`mtlora.adapters.inject.inject_adapters` seam (see
        :func:`mtlora.adapters.mtlora.block.place_mtlora`)."""
        from mtlora.adapters.mtlora.block import place_mtlora  # block-level adapters load when placed

        return place_mtlora(model, adapter_cfg, context, cls)

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token, per-group expert weights ``(..., g, N)``, fp32 (autocast off)."""
        return group_router_probs(x, self.lora_router, self.groups)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z, per_head = self._head_inputs(x)  # (..., r) or, with per-head dropout, (..., N, r)
        pi = self.router_weights(x)
        add_balance_loss(self, pi, self.balance_weight, self.blc_grad)
        return combine_experts(z, pi, self.lora_B, per_head) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, routing_groups={self.groups}, balance_weight={self.balance_weight:g}, "
            f"blc_grad={self.blc_grad}"
        )
