"""mtLoRA's routing pieces shared by its component layer and its block adapters (``docs/methods.md`` §6):
fine-grained routing (FGR) groups, the per-group router softmax, the expert combination and the balance loss
(BLC). The formulas are in :mod:`mtlora.adapters.mtlora.layer`'s module doc."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlora.adapters.balance import cv_squared
from mtlora.adapters.base import AdapterLayer, check_arg, is_int


def routing_groups_for(
    name: str, d_out: int, routing_group_size: int | None, routing_groups: int | None
) -> int:
    """Number of routing groups ``g`` for an output of width ``d_out`` (see the module doc)."""
    if routing_group_size is not None:
        check_arg(
            name,
            "routing_group_size",
            routing_group_size,
            is_int(routing_group_size, 1) and d_out % routing_group_size == 0,
            f"null or an integer >= 1 that divides the adapted output width {d_out}",
        )
        return d_out // routing_group_size
    g = 1 if routing_groups is None else routing_groups
    check_arg(
        name,
        "routing_groups",
        g,
        is_int(g, 1) and d_out % g == 0,
        f"an integer >= 1 that divides the adapted output width {d_out}",
    )
    return g


def fgr_dropout_place(routing_group_size: int | None, groups: int) -> str:
    """The released code's dropout for a component layer: ``input_shared`` (one mask for all experts) when
    fine-grained routing is on (``routing_group_size`` set, or ``g > 1``), else ``input_per_head``."""
    return "input_shared" if routing_group_size is not None or groups > 1 else "input_per_head"


def group_router_probs(x: torch.Tensor, router: torch.Tensor, groups: int) -> torch.Tensor:
    """``softmax`` over experts per group of the router logits ``W_r x``: ``(..., g, N)``, fp32, autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router.float())
        return torch.softmax(logits.unflatten(-1, (groups, -1)), dim=-1)


def combine_experts(z: torch.Tensor, pi: torch.Tensor, lora_B: torch.Tensor, per_head: bool) -> torch.Tensor:
    """``Σ_i Π_i ⊙ B_i z_i`` in one einsum.

    ``z``: ``(..., r)`` shared by the experts, or ``(..., N, r)`` one per expert (``per_head``); ``pi``:
    ``(..., g, N)``; ``lora_B``: ``(N, d_out, r)``. Returns ``(..., d_out)`` in ``z``'s dtype."""
    n, d_out, r = lora_B.shape
    g = pi.shape[-2]
    w = pi.to(z.dtype).unsqueeze(-1)  # (..., g, N, 1)
    zz = z.unsqueeze(-3) if per_head else z[..., None, None, :]  # (..., 1, N, r) or (..., 1, 1, r)
    u = (w * zz).flatten(-2)  # (..., g, N·r): column i·r + j of group k = π_{k,i} z_{i,j}
    b = lora_B.to(z.dtype).view(n, g, d_out // g, r).permute(1, 2, 0, 3).reshape(g, d_out // g, n * r)
    return torch.einsum("...gk,gok->...go", u, b).flatten(-2)


def add_balance_loss(layer: AdapterLayer, pi: torch.Tensor, weight: float, grad: bool = True) -> None:
    """BLC of the routing probabilities ``pi`` (``(..., g, N)``) into ``context.aux_losses`` (training only),
    ``weight`` = ``balance_weight``; detached when ``grad`` is false (``blc_grad``, module doc)."""
    if not layer.training or weight <= 0 or pi.shape[-1] == 1:
        return
    p_bar = pi.float().reshape(-1, pi.shape[-1]).mean(0)  # mean over batch, tokens and groups
    value = weight * cv_squared(p_bar) / max(layer.context.num_layers, 1)
    layer.add_aux_loss("balance", value if grad else value.detach())
