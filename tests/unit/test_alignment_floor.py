"""The KL's row floor: a configuration whose per-group statistics would come from fewer than 6 rows is refused
by the config checks (before any run dir is claimed); MMD needs 2. Rows per group are counted from the batching:
rows per task per micro-batch x GA (window=step) x processes (gather), or the released grouping's smallest
group."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.train import preflight
from mtlora.training.alignment_window import KL_MIN_ROWS
from tests.helpers.compose import compose_train


def _validate(tmp_path: Path, overrides: list[str]) -> None:
    validate_config(compose_train(overrides, run_dir=tmp_path))


def _released_min_group(rows: int, ga: int, n_tasks: int) -> int:
    """Smallest group of the released arithmetic, typed out with torch.split / torch.chunk."""
    chunks = torch.split(torch.arange(rows), ga)
    return min(sum(len(torch.chunk(c, n_tasks)[t]) for c in chunks) for t in range(n_tasks))


def test_the_floor_is_where_the_inverse_variance_gets_a_finite_variance() -> None:
    """σ̂² of n rows ~ σ²χ²_k/k, k = n-1: E[(χ²_k/k)^-2] = k²/((k-2)(k-4)) is finite only for k > 4, i.e. n >= 6;
    a Monte-Carlo check of E[1/σ̂²] = k/(k-2) at the floor."""
    assert KL_MIN_ROWS == 6
    k = KL_MIN_ROWS - 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, KL_MIN_ROWS))
    inv = 1.0 / x.var(axis=1, ddof=1)
    assert inv.mean() == pytest.approx(k / (k - 2), rel=0.02)
    assert math.isfinite(k**2 / ((k - 2) * (k - 4)))


@pytest.mark.parametrize(
    ("overrides", "rows"),
    [
        (["train.gradient_accumulation_steps=2"], 4),  # 2 rows/task x GA 2
        (["alignment.window=micro", "train.micro_batch_size=20", "train.gradient_accumulation_steps=1"], 5),
        (["train.micro_batch_size=4", "train.gradient_accumulation_steps=5"], 5),  # the released 1 row x GA 5
    ],
)
def test_kl_with_fewer_than_6_rows_per_task_is_refused(
    tmp_path: Path, overrides: list[str], rows: int
) -> None:
    cfg = compose_train(["adapter=align_kl", *overrides], run_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=rf"alignment=kl: each group's statistics would come from {rows} rows"
    ) as e:
        preflight(cfg)  # what mtlora.train runs before claiming the run dir
    line = str(e.value).splitlines()[-1]
    assert (
        "data.rows_per_task=" in line and "at least 6" in line and "train.gradient_accumulation_steps" in line
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.gradient_accumulation_steps=3"],  # 2 x 3 = 6 rows per task
        ["alignment.window=micro", "train.micro_batch_size=24", "train.gradient_accumulation_steps=1"],
        ["train.micro_batch_size=4", "train.gradient_accumulation_steps=6"],
    ],
)
def test_kl_with_6_rows_per_task_passes(tmp_path: Path, overrides: list[str]) -> None:
    _validate(tmp_path, ["adapter=align_kl", *overrides])


def test_gathered_rows_count_every_process(tmp_path: Path) -> None:
    """2 processes x 2 rows x GA 2: 4 rows per task per process, 8 with alignment.gather; GA 1 gives 2 x 2."""
    base = ["adapter=align_kl", "hardware=cpu_ddp2", "train.gradient_accumulation_steps=2"]
    with pytest.raises(ConfigError, match=r"from 4 rows"):
        _validate(tmp_path, base)
    _validate(tmp_path, [*base, "alignment.gather=true"])
    with pytest.raises(ConfigError, match=r"from 4 rows .*x 2 processes \(alignment.gather\)"):
        _validate(
            tmp_path,
            [
                "adapter=align_kl",
                "hardware=cpu_ddp2",
                "alignment.gather=true",
                "train.gradient_accumulation_steps=1",
            ],
        )


@pytest.mark.parametrize(("mbs", "ga", "ok"), [(4, 4, False), (4, 8, True), (8, 4, True), (12, 4, True)])
def test_released_grouping_counts_its_smallest_group(tmp_path: Path, mbs: int, ga: int, ok: bool) -> None:
    over = [
        "adapter=align_kl",
        "alignment.grouping=released",
        f"train.micro_batch_size={mbs}",
        f"train.gradient_accumulation_steps={ga}",
    ]
    smallest = _released_min_group(mbs * ga, ga, 4)
    assert (smallest >= 6) == ok
    if ok:
        _validate(tmp_path, over)
    else:
        with pytest.raises(ConfigError, match=rf"from {smallest} rows \(smallest released group"):
            _validate(tmp_path, over)


def test_released_grouping_with_fewer_pieces_than_tasks_is_refused(tmp_path: Path) -> None:
    """Chunks of GA=6 rows cut into 4 pieces give 3 pieces of 2: the released code indexes a missing piece."""
    with pytest.raises(IndexError):
        _released_min_group(24, 6, 4)
    over = ["adapter=align_kl", "alignment.grouping=released", "train.micro_batch_size=4"]
    with pytest.raises(ConfigError, match="alignment.grouping=released: .* set alignment.grouping=task"):
        _validate(tmp_path, [*over, "train.gradient_accumulation_steps=6"])


def test_mmd_has_no_kl_floor(tmp_path: Path) -> None:
    """MMD's kernel is bounded: 2 rows per task are enough (1 is refused: no spread)."""
    _validate(tmp_path, ["adapter=align_mmd", "train.gradient_accumulation_steps=1"])
    with pytest.raises(ConfigError, match=r"alignment=mmd: each group's statistics would come from 1 rows"):
        _validate(
            tmp_path, ["adapter=align_mmd", "train.micro_batch_size=4", "train.gradient_accumulation_steps=1"]
        )


def test_method_defaults_clear_the_floor(tmp_path: Path) -> None:
    for adapter in ("align_kl", "align_mmd"):
        cfg = compose_train([f"adapter={adapter}"], run_dir=tmp_path)
        validate_config(cfg)  # 2 rows per task x GA 5 = 10
        assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps) == (8, 5)
