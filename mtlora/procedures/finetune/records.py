"""The sums a fine-tuning run logs: per log interval, reduced over processes into one ``train.jsonl`` record."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from mtlora.data import MultiTaskData


@dataclass
class Interval:
    """Sums over the steps since the last log line (saved in checkpoints so resumed logs match)."""

    steps: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    align_sum: float = 0.0
    aux_sum: float = 0.0  # adapter auxiliary losses (router balance), as added to the step's loss
    reg_sum: float = 0.0  # model-level regularisers (spectral), as added to the step's loss
    task_loss: dict[str, float] = field(default_factory=dict)
    task_tokens: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()


def add_task_losses(interval: Interval, data: MultiTaskData, task_ids, ce, mask) -> None:
    """Add the summed CE and answer tokens of each task to ``interval``. ``task_ids``: one per row ``(B,)``,
    or one per token ``(B, L)`` for packed rows (data.packing)."""
    if task_ids.dim() == 2:  # per token: position i predicts token i+1, so it counts for that token's task
        task_ids, ce, mask = task_ids[:, 1:].reshape(-1), ce.reshape(-1, 1), mask.reshape(-1, 1)
    per_row_loss = (ce * mask).sum(dim=1)
    per_row_tok = mask.sum(dim=1)
    for t in task_ids.unique().tolist():
        if t < 0:  # padding of packed rows
            continue
        name = data.task_names[t]
        sel = task_ids == t
        interval.task_loss[name] = interval.task_loss.get(name, 0.0) + float(per_row_loss[sel].sum())
        interval.task_tokens[name] = interval.task_tokens.get(name, 0) + int(per_row_tok[sel].sum())


def log_record(acc: Accelerator, it: Interval, step: int, epoch: int, scheduler, grad_norm, tok_s) -> dict:
    """The ``train.jsonl`` record of the interval ``it``: ``loss = Σ CE / Σ tokens`` over its steps and all
    processes, the mean per step of the logged extra terms, and the per-task losses of this process."""
    sums = [it.loss_sum, float(it.tokens), it.align_sum, it.aux_sum, it.reg_sum]
    sums = acc.reduce(torch.tensor(sums, device=acc.device, dtype=torch.float64), reduction="sum")
    rec = {
        "step": step,
        "epoch": epoch,
        "loss": float(sums[0] / sums[1].clamp(min=1)),
        "lr": float(scheduler.get_last_lr()[0]),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": round(tok_s, 1),
    }
    # per step, mean over steps and processes, logged when the run has the term: align_loss = the alignment
    # term before its weight; aux_loss (adapter auxiliary losses) and reg_loss (model-level regularisers) =
    # what was added to the loss, their weights included
    per_step = max(it.steps * acc.num_processes, 1)
    for key, i, value in (
        ("align_loss", 2, it.align_sum),
        ("aux_loss", 3, it.aux_sum),
        ("reg_loss", 4, it.reg_sum),
    ):
        if value:
            rec[key] = float(sums[i]) / per_step
    # per-task loss on this process's rows (rank 0's view under DDP)
    rec["task_loss"] = {k: it.task_loss[k] / max(it.task_tokens[k], 1) for k in sorted(it.task_loss)}
    if torch.cuda.is_available():
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return rec
