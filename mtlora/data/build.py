"""Assemble the multi-task training data of a run from ``cfg.data``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
from omegaconf import DictConfig

from mtlora.data.collate import LOST_PROMPT_SHARE, collate, tokenize_examples, truncation_report
from mtlora.data.mixture import MixtureSchedule, mixture_counts, mixture_probabilities
from mtlora.data.packing import pack, packing_conflicts
from mtlora.data.tasks import load_task
from mtlora.errors import ConfigError

log = logging.getLogger(__name__)


def selected_tasks(data_cfg: DictConfig) -> list[str]:
    """Task names of the mixture in task-id order (``data.select`` restricts and orders them)."""
    available = list(data_cfg.tasks or {})
    select = data_cfg.get("select")
    if not select:
        return available
    unknown = [t for t in select if t not in available]
    if unknown:
        raise ConfigError(
            f"data.select names unknown task(s) {unknown}; tasks of data={data_cfg.name}: {available}"
        )
    repeated = sorted({t for t in select if list(select).count(t) > 1})
    if repeated:
        raise ConfigError(f"data.select names task(s) {repeated} more than once; each task gets one task id")
    return list(select)


BATCHING = ("auto", "shuffle", "task_balanced")


def rows_per_task(cfg: DictConfig) -> int | None:
    """Rows of each task per micro-batch under task-balanced batching, or None for shuffled batches.

    ``data.batching=auto`` is task-balanced exactly when an alignment loss is on (it compares the tasks
    of each micro-batch) or MeTA-LoRA's ``adapter.meta`` is set (support/query rows of every task); ``data.rows_per_task`` defaults to ``train.micro_batch_size / tasks``."""
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


@dataclass
class MultiTaskData:
    """Tokenized per-task splits (list index = task id), the mixture and its realised counts."""

    task_names: list[str]
    train: list[datasets.Dataset]
    eval: list[datasets.Dataset]
    probabilities: dict[str, float]
    counts: dict[str, int]
    schedule: MixtureSchedule
    pad_id: int
    skipped_rows: dict[str, int] = field(default_factory=dict)
    #: ``data.packing``: pack each micro-batch into rows of this many tokens (None: pad, no packing)
    pack_tokens: int | None = None

    def batch(self, pairs: np.ndarray, pad_to: int | None = None) -> dict:
        """Collate the training rows named by ``pairs`` (rows of ``(task_id, row)``); packed into rows of
        ``pack_tokens`` tokens when set (mtlora.data.packing); right-padded to ``pad_to`` positions when
        given."""
        examples = [self.train[int(t)][int(i)] for t, i in pairs]
        if self.pack_tokens:
            return pack(examples, [int(t) for t, _ in pairs], self.pad_id, self.pack_tokens)
        return collate(examples, [int(t) for t, _ in pairs], self.pad_id, pad_to)

    def summary(self) -> list[dict]:
        return [
            {
                "task_id": t,
                "task": name,
                "train_rows": len(self.train[t]),
                "eval_rows": len(self.eval[t]),
                "probability": round(self.probabilities[name], 6),
                "examples_per_epoch": self.counts[name],
                "skipped_rows": self.skipped_rows.get(name, 0),
            }
            for t, name in enumerate(self.task_names)
        ]


def check_truncation(task: str, splits: dict[str, datasets.Dataset], max_seq_len: int) -> None:
    """Warn with counts when rows of ``task`` are longer than ``model.max_seq_len`` (prompts are cut from the
    left, then answers from the right); raise :class:`ConfigError` when more than half of a split's rows
    lose more than half of their prompt (:data:`mtlora.data.collate.LOST_PROMPT_SHARE`)."""
    for split, ds in splits.items():
        if len(ds) == 0:
            continue
        r = truncation_report(ds)
        longest = max(len(ids) + c for ids, c in zip(ds["input_ids"], ds["prompt_cut"]))
        if r["prompt_lost"] > LOST_PROMPT_SHARE * r["rows"]:
            raise ConfigError(
                f"model.max_seq_len={max_seq_len}: {r['prompt_lost']} of {r['rows']} {split} rows of task "
                f"{task!r} lose more than half of their prompt to truncation (the longest row has about "
                f"{longest} tokens); raise model.max_seq_len"
            )
        if r["cut"]:
            log.warning(
                "task %r: %d of %d %s rows are longer than model.max_seq_len=%d and were cut (%d lose more "
                "than half of their prompt, %d lose answer tokens; longest about %d tokens)",
                task,
                r["cut"],
                r["rows"],
                split,
                max_seq_len,
                r["prompt_lost"],
                r["target_cut"],
                longest,
            )


def build_data(data_cfg: DictConfig, tokenizer, max_seq_len: int) -> MultiTaskData:
    names = selected_tasks(data_cfg)
    seed = int(data_cfg.seed)
    train, evals, skipped = [], [], {}
    for name in names:
        splits = load_task(name, data_cfg.tasks[name], seed=seed, on_bad_row=data_cfg.on_bad_row)
        cols = ["input_ids", "prompt_len"]
        tok_train = tokenize_examples(splits.train, tokenizer, max_seq_len)
        tok_eval = tokenize_examples(splits.eval, tokenizer, max_seq_len)
        check_truncation(name, {"train": tok_train, "eval": tok_eval}, max_seq_len)
        train.append(tok_train.select_columns(cols))
        evals.append(tok_eval)
        skipped[name] = splits.skipped_rows
    sizes = {n: len(d) for n, d in zip(names, train)}
    s = data_cfg.sampling
    probs = mixture_probabilities(sizes, s.strategy, float(s.get("temperature", 1.0)), s.get("weights"))
    budget = int(data_cfg.budget) if data_cfg.get("budget") else sum(sizes.values())
    counts = mixture_counts(probs, budget)
    schedule = MixtureSchedule([sizes[n] for n in names], [counts[n] for n in names], seed)
    # data.packing / data.pack_tokens (optional keys; pack_tokens null: model.max_seq_len)
    pack_tokens = int(data_cfg.get("pack_tokens") or max_seq_len) if data_cfg.get("packing", False) else None
    return MultiTaskData(
        names, train, evals, probs, counts, schedule, tokenizer.pad_token_id, skipped, pack_tokens
    )
