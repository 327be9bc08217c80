"""MeTA-LoRA's two-stage meta-learning step (``docs/methods.md`` §7; ``adapter=meta_lora``).

Every micro-batch is task-balanced (``k`` rows of each task). For each task ``t`` of the micro-batch its
rows are split into a **support** set ``S_t`` (the first ``support_rows``) and a **query** set ``Q_t`` (the
rest). With adapter parameters ``θ``:

Stage 1, task-specific adaptation (``inner_steps`` = K plain SGD steps with ``inner_lr`` = α)::

    θ_t⁰ = θ,   θ_tᵏ⁺¹ = θ_tᵏ − α ∇ L(θ_tᵏ; S_t)

Stage 2, meta update (the step's gradient, handed to ``train.optimizer``):

* ``fomaml`` (first-order MAML, the default): ``g = (1/n) Σ_t ∇_θ L(θ_t^K; Q_t)`` with the inner path
  treated as constant (``∂θ_t^K/∂θ = I``);
* ``maml`` (second order): ``g = (1/n) Σ_t ∇_θ L(θ_t^K(θ); Q_t)``, back-propagated through the K inner
  steps (``create_graph``; K+1 times the memory of one step);
* ``reptile``: the inner loop runs on all rows of the task (``S_t ∪ Q_t``) and
  ``g = θ − (1/n) Σ_t θ_t^K`` (a pseudo-gradient: plain SGD with lr β gives Reptile's
  ``θ ← θ + β (mean_t θ_t − θ)``; AdamW uses it as a direction).

``L`` is the mean answer-token cross-entropy of the rows. ``n`` tasks take part per micro-batch: all of
them, or ``tasks_per_step`` drawn without replacement (seeded by the run seed, step and micro-batch). The
micro-batches of one optimizer step average their ``g``; several processes average theirs (an
all-reduce, not DDP's hooks: the inner loops run on the unwrapped model). The logged loss is the query
loss after adaptation (``fomaml``/``maml``) or the loss before adaptation (``reptile``), both as answer-
token means.

Unknowns of the paper that became knobs (methods.md §7): the order, K, α, support/query sizes, tasks per
step. Evaluation uses the shared ``θ`` (no test-time adaptation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtlora.errors import ConfigError
from mtlora.losses.causal_lm import token_cross_entropy

ALGORITHMS = ("fomaml", "maml", "reptile")


@dataclass
class MetaResult:
    """What one micro-batch gives the loop to log: per-token CE and mask of the logged rows."""

    ce: torch.Tensor
    mask: torch.Tensor
    task_ids: torch.Tensor


def _mean_ce(model: nn.Module, params: dict[str, torch.Tensor], batch: dict, rows: torch.Tensor):
    ctx = model.adapter_context
    ctx.begin(task_ids=batch["task_ids"][rows])
    logits = functional_call(
        model,
        params,
        args=(),
        kwargs={"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]},
        strict=False,
    ).logits
    ce, mask = token_cross_entropy(logits, batch["labels"][rows])
    loss = ce.sum() / mask.sum().clamp(min=1)
    aux = ctx.total_aux_loss()
    return (loss if aux is None else loss + aux), ce, mask


@dataclass
class MetaLearner:
    algorithm: str = "fomaml"
    inner_steps: int = 1
    inner_lr: float = 1e-3
    support_rows: int | None = None
    tasks_per_step: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DictConfig | None, seed: int = 0) -> MetaLearner | None:
        """``None`` unless ``adapter.meta`` is set; checks every knob (errors name ``adapter.meta.<key>``)."""
        if not cfg:
            return None
        algo = cfg.get("algorithm", "fomaml")
        if algo not in ALGORITHMS:
            raise ConfigError(f"adapter.meta.algorithm={algo!r}: allowed values are {list(ALGORITHMS)}")
        steps = cfg.get("inner_steps", 1)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"adapter.meta.inner_steps={steps!r}: must be an integer >= 1")
        lr = cfg.get("inner_lr", 1e-3)
        if not isinstance(lr, int | float) or isinstance(lr, bool) or lr <= 0:
            raise ConfigError(f"adapter.meta.inner_lr={lr!r}: must be a number > 0")
        for key in ("support_rows", "tasks_per_step"):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"adapter.meta.{key}={v!r}: must be null or an integer >= 1")
        return cls(algo, steps, float(lr), cfg.get("support_rows"), cfg.get("tasks_per_step"), seed)

    def check_rows(self, rows_per_task: int | None, n_tasks: int) -> None:
        """Fail before training unless micro-batches are task-balanced with a non-empty query set."""
        if rows_per_task is None:
            raise ConfigError(
                "adapter.meta needs task-balanced micro-batches: set data.batching=task_balanced"
            )
        s = self.support(rows_per_task)
        if self.algorithm != "reptile" and s >= rows_per_task:
            raise ConfigError(
                f"adapter.meta.support_rows={s}: must be below data.rows_per_task={rows_per_task} "
                "(the rest of each task's rows are its query set)"
            )
        if self.tasks_per_step is not None and self.tasks_per_step > n_tasks:
            raise ConfigError(
                f"adapter.meta.tasks_per_step={self.tasks_per_step}: the data has {n_tasks} tasks"
            )

    def support(self, rows_per_task: int) -> int:
        return self.support_rows if self.support_rows is not None else max(1, rows_per_task // 2)

    def _tasks(self, task_ids: torch.Tensor, step: int, micro: int) -> list[int]:
        tasks = task_ids.unique(sorted=True).tolist()
        if self.tasks_per_step is None or self.tasks_per_step >= len(tasks):
            return tasks
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        pick = torch.randperm(len(tasks), generator=g)[: self.tasks_per_step]
        return sorted(tasks[i] for i in pick.tolist())

    def _inner(self, model, params, batch, rows, second_order: bool) -> dict[str, torch.Tensor]:
        """θ_t after ``inner_steps`` SGD steps on ``rows``; differentiable w.r.t. θ only if ``second_order``."""
        cur = params if second_order else {n: p.detach().requires_grad_() for n, p in params.items()}
        for _ in range(self.inner_steps):
            loss, _, _ = _mean_ce(model, cur, batch, rows)
            grads = torch.autograd.grad(loss, list(cur.values()), create_graph=second_order)
            cur = {n: p - self.inner_lr * g for (n, p), g in zip(cur.items(), grads)}
            if not second_order:
                cur = {n: p.detach().requires_grad_() for n, p in cur.items()}
        return cur

    def _task_step(
        self, model, params, batch, rows, total
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapt on one task's rows, add its meta-gradient to ``total``; return CE, mask and logged rows."""
        if self.algorithm == "reptile":
            with torch.no_grad():
                _, ce, mask = _mean_ce(model, params, batch, rows)
            adapted = self._inner(model, params, batch, rows, second_order=False)
            for n, p in params.items():
                total[n] += p.detach() - adapted[n].detach()
            return ce, mask, rows
        s = self.support(len(rows))
        support, query = rows[:s], rows[s:]
        second = self.algorithm == "maml"
        adapted = self._inner(model, params, batch, support, second_order=second)
        loss, ce, mask = _mean_ce(model, adapted, batch, query)
        wrt = list(params.values()) if second else list(adapted.values())
        for n, g in zip(params, torch.autograd.grad(loss, wrt, allow_unused=True)):
            if g is not None:
                total[n] += g
        return ce, mask, query

    def accumulate(self, model: nn.Module, batch: dict, scale: float, step: int, micro: int) -> MetaResult:
        """Add ``scale · g`` of this micro-batch to the ``.grad`` of ``model``'s trainable parameters.

        ``model`` is the unwrapped model; ``scale`` is 1/GA."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        task_ids = batch["task_ids"]
        tasks = self._tasks(task_ids, step, micro)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        ces, masks, ids = [], [], []
        # second order needs double backward, which only the math attention kernel has
        with sdpa_kernel([SDPBackend.MATH]) if self.algorithm == "maml" else contextlib.nullcontext():
            for t in tasks:
                ce, mask, rows = self._task_step(
                    model, params, batch, (task_ids == t).nonzero().flatten(), total
                )
                ces.append(ce.detach())
                masks.append(mask)
                ids.append(task_ids[rows])
        k = scale / len(tasks)
        for n, p in params.items():
            g = total[n] * k
            p.grad = g if p.grad is None else p.grad + g
        # the rows of one micro-batch share its padded length
        return MetaResult(torch.cat(ces), torch.cat(masks), torch.cat(ids))


def average_grads_across_processes(params: list[torch.Tensor], accelerator) -> None:
    """Average ``.grad`` over processes (the meta step bypasses DDP's gradient hooks)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="mean")
