"""MeTA-LoRA (adapter=meta_lora) trains the tiny model end to end, alone and under 2-process DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from tests.helpers.training import SHORT_RUN, assert_short_run_learns, logged, train_tiny


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_meta_lora_short_run_learns(tmp_path: Path, algorithm: str) -> None:
    d = train_tiny(
        tmp_path, algorithm, [*SHORT_RUN, "adapter=meta_lora", f"adapter.meta.algorithm={algorithm}"]
    )
    assert_short_run_learns(logged(d))
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["adapter"]["method"] == "lora"


def test_meta_lora_differs_from_plain_lora(tmp_path: Path) -> None:
    """Same data and seed: the meta step is not the plain step (the logged loss is the query loss after
    adaptation, and the update differs)."""
    meta = logged(
        train_tiny(tmp_path, "meta", [*SHORT_RUN, "adapter=meta_lora", "data.batching=task_balanced"])
    )
    plain = logged(train_tiny(tmp_path, "plain", [*SHORT_RUN, "data.batching=task_balanced"]))
    assert meta[0] != pytest.approx(plain[0], rel=1e-3)


def test_meta_lora_needs_task_balanced_batches(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task-balanced"):
        train_tiny(tmp_path, "shuffled", [*SHORT_RUN, "adapter=meta_lora", "data.batching=shuffle"])


def test_meta_lora_with_alignment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alignment=none"):
        train_tiny(tmp_path, "aligned", [*SHORT_RUN, "adapter=meta_lora", "alignment=kl"])


def test_meta_lora_under_two_process_ddp(tmp_path: Path) -> None:
    from tests.helpers.compose import run_cli

    d = tmp_path / "ddp"
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "hardware=cpu_ddp2",
            "adapter=meta_lora",
            "train.max_steps=3",
            "train.log_every=1",
            "eval=none",
            "logger=none",
            "data.budget=128",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((d / "meta.json").read_text())["world_size"] == 2
    assert len(logged(d)) == 3
