"""LoraHub's composition and its gradient-free optimisation.

With K library LoRAs ``(A_i, B_i)`` and weights ``w ∈ [-b, b]^K``, every adapted layer gets the factor-wise
composition :math:`\\hat A = \\sum_i w_i A_i`, :math:`\\hat B = \\sum_i w_i B_i`; ``w`` minimises
:math:`L(w) = \\overline{CE}(w)/n + l_1 \\cdot \\frac{1}{K}\\sum_i |w_i|` (``ce_norm: n_examples``) or
:math:`\\overline{CE}(w) + l_1 \\cdot \\frac{1}{K}\\sum_i |w_i|` (``ce_norm: none``) on the few-shot rows,
with a Nevergrad optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from mtlora.adapters import adapter_layers
from mtlora.errors import ConfigError
from mtlora.losses.causal_lm import token_cross_entropy
from mtlora.procedures.lorahub.library import CE_NORMS


def compose_factors(w: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor):
    """``(Σ_i w_i A_i, Σ_i w_i B_i)`` for stacks ``A: (K, r, d_in)``, ``B: (K, d_out, r)``."""
    w = w.to(a_stack.dtype)
    return torch.tensordot(w, a_stack, dims=1), torch.tensordot(w, b_stack, dims=1)


@torch.no_grad()
def set_composition(model: torch.nn.Module, stacks: dict[str, tuple], w) -> None:
    """Write ``Â = Σ w_i A_i`` and ``B̂ = Σ w_i B_i`` into the LoRA layers' parameters, in place."""
    w = torch.as_tensor(np.asarray(w, dtype=np.float32))
    layers = adapter_layers(model)
    for name, (a, b) in stacks.items():
        layer = layers[name]
        a_hat, b_hat = compose_factors(w.to(a.device), a, b)
        layer.lora_A.copy_(a_hat)
        layer.lora_B.copy_(b_hat)


def fewshot_rows(data, per_task: int, seed: int) -> dict[str, list[int]]:
    """``per_task`` train rows of each task (all when fewer), without replacement, seeded; by task name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, ds in zip(data.task_names, data.train):
        k = min(per_task, len(ds))
        out[name] = sorted(int(i) for i in rng.choice(len(ds), size=k, replace=False))
    return out


def fewshot_batches(data, rows: dict[str, list[int]], batch_size: int, device) -> list[dict]:
    """The few-shot rows collated into batches of ``batch_size`` (task order, then row order)."""
    pairs = [(data.task_names.index(n), i) for n, idx in rows.items() for i in idx]
    batches = []
    for s in range(0, len(pairs), batch_size):
        b = data.batch(np.asarray(pairs[s : s + batch_size]))
        batches.append({k: v.to(device) for k, v in b.items()})
    return batches


@torch.no_grad()
def fewshot_ce(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Mean cross-entropy per answer token over all ``batches`` (tokens pooled), in eval mode."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for b in batches:
        model.adapter_context.begin(task_ids=b["task_ids"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce, mask = token_cross_entropy(logits, b["labels"])
        total += float(ce.sum())
        tokens += int(mask.sum())
    if was_training:
        model.train()
    return total / max(tokens, 1)


class Objective:
    """``L(w) = CE̅(w) / n + l1 · mean|w|`` (``ce_norm="n_examples"``, ``n`` = rows of ``batches``) or
    ``CE̅(w) + l1 · mean|w|`` (``"none"``); every call is recorded in :attr:`history`. Equal weight vectors
    are evaluated once (Nevergrad may ask a point twice; the objective is deterministic)."""

    def __init__(
        self, model, stacks: dict[str, tuple], batches: Sequence[dict], l1: float, ce_norm: str = "n_examples"
    ) -> None:
        if ce_norm not in CE_NORMS:
            raise ConfigError(f"adapter.ce_norm={ce_norm!r}: must be one of {list(CE_NORMS)}")
        self.model, self.stacks, self.batches, self.l1 = model, stacks, batches, float(l1)
        self.n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
        self.ce_divisor = float(max(self.n_examples, 1)) if ce_norm == "n_examples" else 1.0
        self.history: list[dict] = []
        self._cache: dict[tuple, tuple[float, float]] = {}

    def evaluate(self, w) -> tuple[float, float]:
        """``(L(w), CE̅(w))`` (``CE̅`` the pooled answer-token mean, before the division by ``n``)."""
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        key = tuple(np.float32(w).tolist())
        if key not in self._cache:
            set_composition(self.model, self.stacks, w)
            ce = fewshot_ce(self.model, self.batches)
            reg = self.l1 * float(np.mean(np.abs(w))) if len(w) else 0.0
            self._cache[key] = (ce / self.ce_divisor + reg, ce)
        return self._cache[key]

    def __call__(self, w) -> float:
        loss, ce = self.evaluate(w)
        self.history.append(
            {"eval": len(self.history), "weights": np.asarray(w).tolist(), "loss": loss, "ce": ce}
        )
        return loss


def optimize(objective: Objective, k: int, budget: int, bound: float, optimizer: str, seed: int) -> dict:
    """Run Nevergrad on ``objective`` over ``[-bound, bound]^k`` from 0; returns the best evaluated point
    and Nevergrad's recommendation, each with its objective value."""
    try:
        import nevergrad as ng
    except ImportError as e:  # an optional dependency
        raise ImportError(
            "adapter=lorahub needs nevergrad: pip install 'mtlora[lorahub]' (or pip install nevergrad)"
        ) from e
    if optimizer not in ng.optimizers.registry:
        raise ConfigError(
            f"adapter.optimizer={optimizer!r}: not a Nevergrad optimizer (e.g. NGOpt, CMA, OnePlusOne)"
        )
    zero = np.zeros(k)
    loss0, ce0 = objective.evaluate(zero)  # the base model (B̂ = 0); a candidate, not counted in the budget
    param = ng.p.Array(init=zero, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RHOEND.*")  # scipy's COBYLA, chosen by NGOpt
        for _ in range(budget):
            cand = opt.ask()
            opt.tell(cand, objective(cand.value))
        rec = opt.provide_recommendation()
    best = min(objective.history, key=lambda r: r["loss"])
    if loss0 < best["loss"]:
        best = {"eval": None, "weights": zero.tolist(), "loss": loss0, "ce": ce0}
    rec_w = np.asarray(rec.value, dtype=np.float64).reshape(-1)
    rec_loss, rec_ce = objective.evaluate(rec_w)  # not an optimizer evaluation: kept out of the history
    return {
        "best_evaluated": best,
        "recommendation": {"weights": rec_w.tolist(), "loss": rec_loss, "ce": rec_ce},
        "loss_at_zero": loss0,
        "ce_at_zero": ce0,
        "nevergrad_optimizer": str(getattr(opt, "optim", type(opt).__name__)),
    }
