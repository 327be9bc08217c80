"""How the rows of a micro-batch are drawn: shuffled, or task-balanced (the same number of rows of every
task). Torch-free: validation computes it before anything is built, the training loop to build its stream."""

from __future__ import annotations

from omegaconf import DictConfig

from mtlora.data.selection import selected_tasks
from mtlora.errors import ConfigError

BATCHING = ("auto", "shuffle", "task_balanced")


def rows_per_task(cfg: DictConfig) -> int | None:
    """Rows of each task per micro-batch under task-balanced batching, or None for shuffled batches.

    ``data.batching=auto`` is task-balanced exactly when an alignment loss is on (it compares the tasks
    of each micro-batch) or MeTA-LoRA's ``adapter.meta`` is set (support/query rows of every task); ``data.rows_per_task`` defaults to ``train.micro_batch_size / tasks``."""
    from mtlora.data.packing import packing_conflicts  # imports torch (the packer)

    conflicts = packing_conflicts(cfg)  # data.packing needs adapters/losses that ignore row task ids
    if conflicts:
        raise ConfigError("; ".join(conflicts))
    mode = cfg.data.get("batching", "auto")
    if mode not in BATCHING:
        raise ConfigError(f"data.batching={mode!r}: allowed values are {list(BATCHING)}")
    aligned = cfg.alignment.get("name", "none") != "none"
    meta = bool(cfg.adapter.get("meta"))  # MeTA-LoRA splits each task's rows into support and query
    if mode == "shuffle" or (mode == "auto" and not (aligned or meta)):
        if aligned or meta:
            who = f"alignment={cfg.alignment.name}" if aligned else "adapter.meta (MeTA-LoRA)"
            raise ConfigError(
                f"{who} needs task-balanced micro-batches: set data.batching=auto or task_balanced"
            )
        return None
    n_tasks = len(selected_tasks(cfg.data))
    mbs = int(cfg.train.micro_batch_size)
    k = cfg.data.get("rows_per_task") or mbs // max(n_tasks, 1)
    # alignment over one micro-batch needs 2 rows per task; over a window (alignment.window=step) the
    # alignment term checks its rows per group (mtlora.training.alignment_window)
    low = 2 if meta or (aligned and cfg.alignment.get("window", "micro") == "micro") else 1
    if k < low or k * n_tasks != mbs:
        why = " (alignment needs 2 to estimate a variance)" if low == 2 else ""
        raise ConfigError(
            f"task-balanced batching: train.micro_batch_size={mbs} must equal data.rows_per_task ({k}) x "
            f"{n_tasks} tasks with at least {low} row(s) per task{why}"
        )
    return int(k)
