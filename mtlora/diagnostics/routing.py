r"""Routing statistics of token-routed adapters (``docs/methods.md`` §10.6; mtLoRA fig1a, figS4, BLC).

For a layer whose router gives per-token expert weights ``π(x) ∈ Δ^N`` (per routing group ``g`` for
mtLoRA's fine-grained routing: ``π ∈ R^{G×N}``), over the non-padding tokens ``x`` of the batches:

* **routing entropy** ``H(x) = −Σ_i π_i log(π_i + 10^{-10})`` per token and group, averaged over tokens and
  groups → per layer → mean over layers;
* **expert-usage CV²** (mtLoRA's BLC): ``p̄ = mean_{tokens, groups} π`` and
  ``cv² = Var(p̄) / (Mean(p̄)² + 10^{-10})`` (unbiased variance over the N experts, as ``torch.var``);
* **routing pattern**: the mean ``π`` (``G×N``) over the tokens of each task, per layer.

Applies to layers with a token router: ``router_weights(x)`` (HydraLoRA, R-LoRA, mtLoRA component and block
adapters) or ``router_probs(x)`` (MoLoRA, dense probabilities before top-k). Task-gated adapters (MOELoRA,
MTL-LoRA) and router-free ones (LoRA, M-LoRA) are not routed per token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mtlora.diagnostics.common import adapter_layers, model_device, nanmean, to_device

EPS = 1e-10


def router_fn(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's per-token router (input → weights ``(..., N)`` or ``(..., G, N)``), or ``None``."""
    if getattr(layer, "routed", True) is False:
        return None
    return getattr(layer, "router_weights", None) or getattr(layer, "router_probs", None)


def _as_groups(pi: torch.Tensor, token_dims: int) -> torch.Tensor:
    """Router output as ``(tokens..., G, N)``: a group axis of 1 is added to ungrouped routers."""
    return pi.unsqueeze(-2) if pi.ndim == token_dims + 1 else pi


def token_entropy(pi: torch.Tensor) -> torch.Tensor:
    """``−Σ_i π_i log(π_i + 1e-10)`` over the last (expert) dim, fp64."""
    p = pi.double()
    return -(p * torch.log(p + EPS)).sum(-1)


def routing_entropy(pi: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean token entropy of ``pi`` (``(B, S, N)`` or ``(B, S, G, N)``) over the unmasked tokens and groups."""
    pi = _as_groups(pi, 2)
    h = token_entropy(pi).mean(-1)  # (B, S)
    m = torch.ones_like(h, dtype=torch.bool) if mask is None else mask.bool()
    return float(h[m].mean())


def cv_squared(p_bar: torch.Tensor | np.ndarray) -> float:
    """``Var(p̄) / (Mean(p̄)² + 1e-10)`` with the unbiased variance (0 for one expert)."""
    p = torch.as_tensor(p_bar).double().reshape(-1)
    if p.numel() < 2:
        return 0.0
    return float(p.var() / (p.mean() ** 2 + EPS))


def usage_cv2(pi: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """CV² of the mean routing probability per expert over the unmasked tokens and the groups."""
    pi = _as_groups(pi, 2)
    m = torch.ones(pi.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return cv_squared(pi[m].double().reshape(-1, pi.shape[-1]).mean(0))


class _Accumulator:
    """Sums over the tokens of one layer: entropy, π (all tasks and per task)."""

    def __init__(self) -> None:
        self.h_sum, self.count = 0.0, 0
        self.pi_sum: torch.Tensor | None = None
        self.task_sum: dict[int, torch.Tensor] = {}
        self.task_count: dict[int, int] = {}

    def add(self, pi: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> None:
        pi = _as_groups(pi.detach().double().cpu(), 2)  # (B, S, G, N)
        m = mask.bool().cpu()
        sel = pi[m]  # (tokens, G, N)
        self.h_sum += float(token_entropy(sel).mean(-1).sum())
        self.count += int(sel.shape[0])
        s = sel.sum(0)
        self.pi_sum = s if self.pi_sum is None else self.pi_sum + s
        rows = task_ids.cpu()
        for t in rows.unique().tolist():
            r = pi[rows == t][m[rows == t]]
            self.task_sum[t] = self.task_sum.get(t, torch.zeros_like(s)) + r.sum(0)
            self.task_count[t] = self.task_count.get(t, 0) + int(r.shape[0])

    def result(self, task_names: list[str] | None) -> dict:
        p_grid = self.pi_sum / max(self.count, 1)  # (G, N) mean π over tokens
        return {
            "entropy": self.h_sum / max(self.count, 1),
            "cv2": cv_squared(p_grid.mean(0)),
            "usage": p_grid.mean(0).tolist(),
            "per_task": {
                (task_names[t] if task_names else str(t)): (
                    self.task_sum[t] / max(self.task_count[t], 1)
                ).tolist()
                for t in sorted(self.task_sum)
            },
            "tokens": self.count,
        }


@torch.no_grad()
def routing_stats(
    model: nn.Module, batches_by_task: dict[int, list[dict]], task_names: list[str] | None = None
) -> dict | None:
    """Routing entropy, usage CV² and per-task routing patterns of every token-routed layer (``None`` if none).

    Returns ``{"entropy", "cv2" (means over layers), "layers": {name: {"entropy", "cv2", "usage" [N],
    "per_task": {task: G×N}, "tokens"}}, "middle_layer": name}``."""
    routers = {n: f for n, layer in adapter_layers(model).items() if (f := router_fn(layer)) is not None}
    if not routers:
        return None
    acc = {n: _Accumulator() for n in routers}
    layers = adapter_layers(model)
    state: dict = {}

    def hook_for(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            acc[name].add(routers[name](x), state["mask"], state["task_ids"])

        return hook

    handles = [layers[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in routers]
    device = model_device(model)
    try:
        for batches in batches_by_task.values():
            for b in batches:
                b = to_device(b, device)
                state.update(mask=b["attention_mask"], task_ids=b["task_ids"])
                model.adapter_context.begin(task_ids=b["task_ids"])
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    per_layer = {n: a.result(task_names) for n, a in acc.items() if a.count}
    if not per_layer:
        return None
    names = list(per_layer)
    return {
        "entropy": nanmean([v["entropy"] for v in per_layer.values()]),
        "cv2": nanmean([v["cv2"] for v in per_layer.values()]),
        "layers": per_layer,
        "middle_layer": names[len(names) // 2],
    }
