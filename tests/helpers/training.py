"""Train the tiny model in this process for a test, and read what the run logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mtlora.procedures.finetune.recipe import run_training
from tests.helpers.compose import compose_train

#: a six-step run of the tiny model on 128 synthetic rows, logging every step
SHORT_RUN = ["debug=smoke", "train.max_steps=6", "eval=none", "data.budget=128", "train.log_every=1"]

#: a three-step run with a large learning rate, so that the adapter moves away from its init (export tests)
EXPORT_RUN = [
    "debug=smoke",
    "train.max_steps=3",
    "eval=none",
    "train.optimizer.lr=0.05",
    "train.warmup_ratio=0.0",
    "train.micro_batch_size=4",
    "data.budget=32",
]
#: prompts whose logits the export tests compare
EXPORT_PROMPTS = ["12+7=", "sort: pear apple fig ->", "not (true and false) is"]


def train_tiny(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    """Run ``run_training`` for the composed ``overrides`` into ``tmp_path/name``; returns the run dir."""
    d = tmp_path / name
    d.mkdir()
    run_training(compose_train(overrides, run_dir=d), d)
    return d


def logged(run_dir: Path, key: str = "loss") -> list:
    """The ``key`` of every record of ``metrics/train.jsonl``."""
    lines = (run_dir / "metrics" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def assert_short_run_learns(losses: list[float]) -> None:
    """Six finite losses that fall clearly (by 0.3) and stay lower in the second half."""
    assert len(losses) == 6
    assert all(math.isfinite(x) and x < 10 for x in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert min(losses[3:]) < min(losses[:2]), losses
