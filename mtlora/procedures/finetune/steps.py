r"""The optimizer step of fine-tuning: what one step does with its ``GA`` micro-batches, up to the
gradients. One strategy is chosen at setup (:func:`choose_step`); the recipe then clips, steps the
optimizer and scheduler, and logs.

With micro-batches :math:`b_1..b_{GA}` on each of :math:`W` processes and :math:`N` answer tokens in the
step over all processes, every strategy but the meta step back-propagates, per micro-batch,

.. math::

    \ell_i = \frac{W}{N} \sum_{t \in b_i} \mathrm{CE}_t + \frac{1}{GA}\,\mathrm{aux}_i
             + [i = 1]\,\frac{1}{GA} \sum_r \mathrm{reg}_r

so that DDP's mean over processes gives the global answer-token mean; adapter auxiliary losses
(``adapter_context.aux_losses``) count :math:`1/GA` per micro-batch and model-level regularisers
(``adapter_context.regularizers``) once per step, on its first micro-batch.

* :class:`PlainStep`: one backward per micro-batch;
* :class:`AlignmentStep` (``alignment`` group, Align-LoRA): adds :math:`\lambda R` on the captured
  representations, per micro-batch (``window: micro``, :math:`\lambda R_i / GA` in :math:`\ell_i`) or once
  over the rows of the whole step (``window: step``: the step's losses and
  :math:`w \cdot R(b_1..b_{GA})` back-propagated together, :math:`w = \lambda/GA` or :math:`\lambda`;
  :mod:`mtlora.training.alignment_window`);
* :class:`MetaStep` (``adapter.meta``, MeTA-LoRA): the support/query meta step of
  :mod:`mtlora.training.meta_lora` on the unwrapped model, gradients averaged over processes by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from mtlora.data import MultiTaskData
from mtlora.errors import ConfigError
from mtlora.losses.causal_lm import causal_lm_loss
from mtlora.procedures.finetune.records import Interval, add_task_losses
from mtlora.training.alignment_window import AlignmentTerm
from mtlora.training.deepspeed import backward_kwargs, micro_batch_context
from mtlora.training.meta_lora import MetaLearner, average_grads_across_processes


@dataclass
class StepEnv:
    """What a step works on, fixed for the run (built once the model is prepared)."""

    acc: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP / DeepSpeed engine)
    inner: torch.nn.Module  # the unwrapped model
    trainable: list[torch.nn.Parameter]
    data: MultiTaskData
    interval: Interval
    ga: int  # train.gradient_accumulation_steps
    steps_per_epoch: int
    loss_impl: str  # train.loss.impl
    loss_chunk: int  # train.loss.chunk_tokens


@dataclass
class StepTotals:
    """One step on this process: summed answer-token CE, answer tokens, and input tokens (throughput)."""

    loss: float = 0.0
    tokens: int = 0
    seen: int = 0


class PlainStep:
    """One forward and backward per micro-batch (gradient sync on the last one)."""

    #: alignment.pad_to: rows right-padded to this many positions (None: to the longest row)
    pad_to: int | None = None
    #: whether the adapter context captures the representations the step needs
    capture = False

    def run(self, env: StepEnv, step: int, tensors: list[dict], scale: float, n_tokens: int) -> StepTotals:
        """Accumulate the gradients of step ``step`` (0-based) from ``tensors``; ``scale = W / N``."""
        self.begin()
        ctx = env.inner.adapter_context
        totals = StepTotals(tokens=n_tokens)
        for i, b in enumerate(tensors):
            sync = i == env.ga - 1
            with micro_batch_context(env.acc, env.model, sync):  # no_sync / DeepSpeed's accumulation boundary
                ctx.begin(task_ids=b["task_ids"], capture=self.capture)
                ce, mask = causal_lm_loss(
                    env.model, b, env.loss_impl, env.loss_chunk, env.inner.get_output_embeddings()
                )
                loss = self.with_alignment(env, ce.sum() * scale, b)
                loss = adapter_terms(env, loss, step, i)
                self.backward(env, loss, sync)
            totals.loss += float(ce.detach().sum())
            totals.seen += int(b["attention_mask"].sum())
            add_task_losses(env.interval, env.data, b.get("token_task_ids", b["task_ids"]), ce.detach(), mask)
        return totals

    def begin(self) -> None:
        """Reset the per-step state (none here)."""

    def with_alignment(self, env: StepEnv, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        return loss

    def backward(self, env: StepEnv, loss: torch.Tensor, sync: bool) -> None:
        env.acc.backward(loss, **backward_kwargs(env.acc))


def adapter_terms(env: StepEnv, loss: torch.Tensor, step: int, i: int) -> torch.Tensor:
    r"""``loss`` + :math:`\mathrm{aux}/GA` (adapter auxiliary losses of micro-batch ``i``) + on the step's
    first micro-batch :math:`\sum_r \mathrm{reg}_r/GA` (model-level regularisers), logged as added."""
    ctx, ga, it = env.inner.adapter_context, env.ga, env.interval
    aux = ctx.total_aux_loss()
    if aux is not None:
        loss = loss + aux / ga
        it.aux_sum += float(aux.detach()) / ga
    if i == 0:  # model-level regularisers: once per step, on its first micro-batch, ÷ GA
        for reg in ctx.regularizers:
            r = reg(step, env.steps_per_epoch)
            if r is not None:
                loss = loss + r / ga
                it.reg_sum += float(r.detach()) / ga
    return loss


class AlignmentStep(PlainStep):
    r""":class:`PlainStep` plus the alignment term :math:`R` on the captured representations.

    ``window: micro``: :math:`\ell_i \mathrel{+}= \lambda R(b_i)/GA`, one backward per micro-batch.
    ``window: step``: the pooled rows of every micro-batch are kept; at the last micro-batch
    :math:`\sum_i \ell_i + w R(b_1..b_{GA})` is back-propagated at once (:meth:`AlignmentTerm.step_weight`).
    The logged ``align_loss`` is :math:`R` before its weight, averaged over the step's windows."""

    capture = True

    def __init__(self, align: AlignmentTerm) -> None:
        self.align = align
        self.pad_to = align.pad_to
        self.begin()

    def begin(self) -> None:
        self.pending: torch.Tensor | None = None  # window=step: the step's summed losses
        self.reps: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def with_alignment(self, env: StepEnv, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        align, ctx = self.align, env.inner.adapter_context
        if align.per_micro_batch:
            a = align(ctx.captured, batch["task_ids"], batch["attention_mask"])
            if a is not None:  # averaged over the micro-batches of the step
                loss = loss + align.weight * a / env.ga
                env.interval.align_sum += float(a.detach()) / env.ga
        else:  # window=step: pooled rows of every micro-batch, one backward
            self.reps.append(align.pooled(ctx.captured, batch["attention_mask"]))
            self.ids.append(batch["task_ids"])
        return loss

    def backward(self, env: StepEnv, loss: torch.Tensor, sync: bool) -> None:
        if self.align.per_micro_batch:
            super().backward(env, loss, sync)
            return
        self.pending = loss if self.pending is None else self.pending + loss
        if sync:
            a = self.align.from_pooled(self.reps, self.ids)
            if a is not None:
                self.pending = self.pending + self.align.step_weight(env.ga) * a  # λ/GA (code) or λ (paper)
                env.interval.align_sum += float(a.detach())
            env.acc.backward(self.pending, **backward_kwargs(env.acc))
            self.begin()  # the step's graph is released


class MetaStep(PlainStep):
    r"""MeTA-LoRA: per micro-batch, :meth:`MetaLearner.accumulate` adds :math:`g/GA` (inner loops on the
    unwrapped model); the processes' gradients are then averaged (an all-reduce, not DDP's hooks). The
    logged loss and tokens are those of the rows the meta step reports."""

    def __init__(self, meta: MetaLearner) -> None:
        self.meta = meta

    def run(self, env: StepEnv, step: int, tensors: list[dict], scale: float, n_tokens: int) -> StepTotals:
        totals = StepTotals()
        for i, b in enumerate(tensors):
            res = self.meta.accumulate(env.inner, b, 1.0 / env.ga, step, i)
            totals.loss += float(res.ce.sum())
            totals.tokens += int(res.mask.sum())
            totals.seen += int(b["attention_mask"].sum())
            add_task_losses(env.interval, env.data, res.task_ids, res.ce, res.mask)
        average_grads_across_processes(env.trainable, env.acc)
        return totals


def choose_step(cfg: DictConfig, per_task: int, n_tasks: int, n_processes: int) -> PlainStep:
    """The step of ``cfg``: :class:`MetaStep` with ``adapter.meta``, :class:`AlignmentStep` with an
    ``alignment`` term, else :class:`PlainStep`. Checks that the micro-batches hold the rows they need
    (``per_task`` rows of each of ``n_tasks`` tasks per micro-batch under task-balanced batching)."""
    align = AlignmentTerm.from_config(cfg.alignment)
    meta = MetaLearner.from_config(cfg.adapter.get("meta"), seed=int(cfg.seed))
    if meta is not None:
        if align is not None:
            raise ConfigError("adapter.meta and alignment cannot be combined: set alignment=none")
        meta.check_rows(per_task, n_tasks)
        return MetaStep(meta)
    if align is None:
        return PlainStep()
    if per_task:  # statistics from enough rows per group (alignment.window, GA)
        align.check_rows(per_task, n_tasks, int(cfg.train.gradient_accumulation_steps), n_processes)
    return AlignmentStep(align)
