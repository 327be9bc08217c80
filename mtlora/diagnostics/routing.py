r"""Routing statistics of token-routed adapters (``docs/methods.md`` §10.6; mtLoRA fig1a, figS4, BLC).

For a layer whose router gives per-token expert weights ``π(x) ∈ Δ^N`` (per routing group ``g`` for
mtLoRA's fine-grained routing: ``π ∈ R^{G×N}``), over the tokens ``x`` of the batches:

* **routing entropy** ``H(x) = −Σ_i π_i log(π_i + 10^{-10})`` per token and group, averaged two ways:
  ``entropy_masked`` — over the non-padding tokens of all batches pooled (then groups) → per layer → mean
  over layers; ``entropy_all_positions`` — mtLoRA's fig1a notebook: the mean over *every* position of a
  padded batch (padding included) and the groups, per batch → mean over batches → per layer → mean over
  layers. ``entropy`` is the one of the ``protocol``;
* **expert-usage CV²** (mtLoRA's BLC): ``cv² = Var(p̄) / (Mean(p̄)² + 10^{-10})`` (unbiased variance over
  the N experts, as ``torch.var``) of the mean routing weight per expert ``p̄`` over non-padding tokens and
  groups: ``cv2`` pools all tokens of all batches; ``cv2_per_batch`` takes ``p̄`` per batch and averages
  the batches' CV², as the balance loss sees it in training (per training batch);
* **routing pattern**: the mean ``π`` (``G×N``) over the tokens of each task, per layer.

Protocols (``diagnostics.routing.protocol``; the rows are chosen by the runner):

* ``tokens`` [our choice]: ``max_examples_per_task`` training rows of each task (prompt + answer), mixed
  across tasks into batches of ``batch_size`` as in training; headline ``entropy = entropy_masked``;
* ``notebook`` [code: fig1a]: ``max_examples`` training rows drawn from the pool of all tasks, the prompt
  only, left-padded batches of ``batch_size`` (the notebook: 500 rows, batch 4); headline
  ``entropy = entropy_all_positions``.

Applies to layers with a token router (``AdapterLayer.token_routed``, from the method's spec), read through
``AdapterLayer.router_weights(x)`` (HydraLoRA, R-LoRA, mtLoRA component and block adapters; MoLoRA's dense
probabilities before top-k). Task-gated adapters (MOELoRA, MTL-LoRA) and router-free ones (LoRA, M-LoRA) are
not routed per token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mtlora.adapters.balance import cv_squared as balance_cv_squared
from mtlora.adapters.base import AdapterLayer, adapter_layers
from mtlora.diagnostics.common import model_device, nanmean, to_device

EPS = 1e-10
PROTOCOLS = ("tokens", "notebook")


def router_fn(layer: AdapterLayer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The layer's per-token router (input → weights ``(..., N)`` or ``(..., G, N)``), or ``None``."""
    return layer.router_weights if layer.token_routed else None


def _as_groups(pi: torch.Tensor, token_dims: int) -> torch.Tensor:
    """Router output as ``(tokens..., G, N)``: a group axis of 1 is added to ungrouped routers."""
    return pi.unsqueeze(-2) if pi.ndim == token_dims + 1 else pi


def token_entropy(pi: torch.Tensor) -> torch.Tensor:
    """``−Σ_i π_i log(π_i + 1e-10)`` over the last (expert) dim, fp64."""
    p = pi.double()
    return -(p * torch.log(p + EPS)).sum(-1)


def cv_squared(p_bar: torch.Tensor | np.ndarray) -> float:
    """``cv²`` of the expert usage ``p̄`` (all values, fp64; :func:`mtlora.adapters.balance.cv_squared`)."""
    return float(balance_cv_squared(torch.as_tensor(p_bar).double().reshape(-1)))


class _Accumulator:
    """Sums over the tokens of one layer: entropy, π (all tasks and per task), and per-batch values."""

    def __init__(self) -> None:
        self.h_sum, self.count = 0.0, 0
        self.pi_sum: torch.Tensor | None = None
        self.task_sum: dict[int, torch.Tensor] = {}
        self.task_count: dict[int, int] = {}
        self.batch_h_all: list[float] = []  # mean entropy over every position of a batch (padding included)
        self.batch_cv2: list[float] = []  # CV² of the batch's mean routing weights (non-padding tokens)

    def add(self, pi: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> None:
        pi = _as_groups(pi.detach().double().cpu(), 2)  # (B, S, G, N)
        m = mask.bool().cpu()
        self.batch_h_all.append(float(token_entropy(pi).mean()))
        sel = pi[m]  # (tokens, G, N)
        if not sel.shape[0]:
            return
        self.h_sum += float(token_entropy(sel).mean(-1).sum())
        self.count += int(sel.shape[0])
        s = sel.sum(0)
        self.pi_sum = s if self.pi_sum is None else self.pi_sum + s
        self.batch_cv2.append(cv_squared((s / sel.shape[0]).mean(0)))
        rows = task_ids.cpu()
        for t in rows.unique().tolist():
            r = pi[rows == t][m[rows == t]]
            self.task_sum[t] = self.task_sum.get(t, torch.zeros_like(s)) + r.sum(0)
            self.task_count[t] = self.task_count.get(t, 0) + int(r.shape[0])

    def result(self, task_names: list[str] | None) -> dict:
        p_grid = self.pi_sum / max(self.count, 1)  # (G, N) mean π over tokens
        return {
            "entropy_masked": self.h_sum / max(self.count, 1),
            "entropy_all_positions": float(np.mean(self.batch_h_all)),
            "cv2": cv_squared(p_grid.mean(0)),
            "cv2_per_batch": float(np.mean(self.batch_cv2)),
            "usage": p_grid.mean(0).tolist(),
            "per_task": {
                (task_names[t] if task_names else str(t)): (
                    self.task_sum[t] / max(self.task_count[t], 1)
                ).tolist()
                for t in sorted(self.task_sum)
            },
            "tokens": self.count,
            "batches": len(self.batch_h_all),
        }


@torch.no_grad()
def routing_stats(
    model: nn.Module,
    batches: list[dict] | dict[int, list[dict]],
    task_names: list[str] | None = None,
    protocol: str = "tokens",
) -> dict | None:
    """Routing entropy, usage CV² and per-task routing patterns of every token-routed layer (``None`` if none).

    ``batches``: a list of batches (each with ``input_ids``, ``attention_mask``, ``task_ids``), or such lists
    by task. Returns ``{"protocol", "entropy" (of the protocol), "entropy_masked", "entropy_all_positions",
    "cv2", "cv2_per_batch" (means over layers), "layers": {name: {the same per layer, "usage" [N],
    "per_task": {task: G×N}, "tokens", "batches"}}, "middle_layer": name}``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: must be one of {PROTOCOLS}")
    if isinstance(batches, dict):
        batches = [b for bl in batches.values() for b in bl]
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
    for v in per_layer.values():
        v["entropy"] = v["entropy_all_positions"] if protocol == "notebook" else v["entropy_masked"]
    names = list(per_layer)

    def mean(key: str) -> float | None:
        return nanmean([v[key] for v in per_layer.values()])

    return {
        "protocol": protocol,
        "entropy": mean("entropy"),
        "entropy_masked": mean("entropy_masked"),
        "entropy_all_positions": mean("entropy_all_positions"),
        "cv2": mean("cv2"),
        "cv2_per_batch": mean("cv2_per_batch"),
        "layers": per_layer,
        "middle_layer": names[len(names) // 2],
    }
