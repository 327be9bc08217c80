"""Assemble the multi-task training data of a run from ``cfg.data``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
from omegaconf import DictConfig

from mtlora.data.batching import BATCHING, rows_per_task
from mtlora.data.collate import LOST_PROMPT_SHARE, collate, tokenize_examples, truncation_report
from mtlora.data.mixture import MixtureSchedule, mixture_counts, mixture_probabilities
from mtlora.data.packing import pack
from mtlora.data.selection import selected_tasks
from mtlora.data.tasks import load_task
from mtlora.errors import ConfigError

# the batching rule and the task selection live in torch-free modules; named here for their importers
__all__ = ["BATCHING", "MultiTaskData", "build_data", "check_truncation", "rows_per_task", "selected_tasks"]

log = logging.getLogger(__name__)


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
