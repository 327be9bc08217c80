"""Short in-process runs of the tiny model with data.packing (and the chunked loss): the loss falls, every
task's loss is logged, and the first step's loss and per-task losses equal those of the padded run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from tests.helpers.training import SHORT_RUN, assert_short_run_learns, logged, train_tiny

TASKS = {"arithmetic", "word_sorting", "boolean_expressions", "counting"}


def test_packed_run_learns_and_logs_task_losses(tmp_path: Path) -> None:
    packed = train_tiny(
        tmp_path,
        "packed",
        [*SHORT_RUN, "+data.packing=true", "train.loss.impl=chunked", "train.loss.chunk_tokens=64"],
    )
    losses = logged(packed)
    assert_short_run_learns(losses)
    task_loss = logged(packed, "task_loss")
    assert all(set(t) == TASKS for t in task_loss), task_loss
    # step 1 sees the same examples with the same weights: same loss and per-task losses as padded rows
    ref = train_tiny(tmp_path, "padded", [*SHORT_RUN, "train.max_steps=1"])
    assert losses[0] == pytest.approx(logged(ref)[0], rel=1e-5)
    ref_tasks = logged(ref, "task_loss")[0]
    assert task_loss[0] == pytest.approx(ref_tasks, rel=1e-5)


def test_packing_refused_for_task_aware_adapter_at_run_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="routes by task"):
        train_tiny(tmp_path, "mtl", [*SHORT_RUN, "+data.packing=true", "adapter=mtl_lora"])
