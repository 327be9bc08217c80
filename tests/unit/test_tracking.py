"""Trackers (logger=), step intervals (``auto``), log lines and the per-task CSV columns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from mtlora.run import tracker as tracker_mod
from mtlora.run.metrics import heldin_line, train_csv_rows, train_line
from mtlora.run.schedule import resolve_every
from mtlora.run.tracker import flat_params, flat_values, heldin_values, tracker_name
from tests.helpers.compose import compose_train

REC = {
    "step": 20,
    "epoch": 0,
    "loss": 1.23456,
    "lr": 2.5e-4,
    "grad_norm": None,
    "tokens_per_s": 12345.6,
    "task_loss": {"arithmetic": 1.5, "counting": 0.75},
}


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb", "wandb_offline"])
def test_a_missing_tracker_package_is_a_one_line_config_error(name: str, monkeypatch) -> None:
    monkeypatch.setattr(tracker_mod.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(ConfigError) as e:
        tracker_name({"name": name})
    msg = str(e.value)
    assert "\n" not in msg and f"logger={name} needs the" in msg and "pip install" in msg


def test_the_missing_package_is_reported_by_validation_before_the_run(monkeypatch, tmp_path: Path) -> None:
    from mtlora.config import validate_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        tracker_mod.importlib.util, "find_spec", lambda m: None if m == "tensorboard" else real(m)
    )
    cfg = compose_train(["logger=tensorboard"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^logger=tensorboard needs the tensorboard package"):
        validate_config(cfg)


def test_csv_and_none_start_no_tracker() -> None:
    assert tracker_name({"name": "csv"}) is None and tracker_name({"name": "none"}) is None
    assert tracker_name({"name": "wandb_offline"}) == "wandb"


def test_values_are_logged_flat_with_slash_keys() -> None:
    flat = flat_values({"train/loss": 1.0, "train/task_loss": {"a": 2.0, "b": 3}, "train/grad_norm": None})
    assert flat == {"train/loss": 1.0, "train/task_loss/a": 2.0, "train/task_loss/b": 3}
    result = {
        "tasks": {"a": {"n": 4, "loss": 1.0, "token_acc": 0.5, "exact_match": 0.25}},
        "macro": {"loss": 1.0, "token_acc": 0.5, "exact_match": 0.25},
        "micro": {"n": 4, "loss": 1.0, "token_acc": 0.5, "exact_match": 0.25},
    }
    assert heldin_values(result) == {
        "eval/heldin/a/loss": 1.0,
        "eval/heldin/a/token_acc": 0.5,
        "eval/heldin/a/exact_match": 0.25,
        "eval/heldin/macro/loss": 1.0,
        "eval/heldin/macro/token_acc": 0.5,
        "eval/heldin/macro/exact_match": 0.25,
    }
    assert flat_params({"train": {"lr": 0.1, "betas": [0.9, 0.99]}, "tags": None}) == {
        "train.lr": 0.1,
        "train.betas": "[0.9, 0.99]",
        "tags": None,
    }


@pytest.mark.parametrize(
    "value,total,expected",
    [("auto", 1500, 150), ("auto", 60, 6), ("auto", 4, 1), ("auto", 14, 1), ("auto", 16, 2), (50, 1500, 50)],
)
def test_auto_intervals_are_a_tenth_of_the_run(value, total: int, expected: int) -> None:
    assert resolve_every(value, total, "train.checkpoint_every") == expected
    assert resolve_every(None, total, "train.checkpoint_every") is None


def test_a_bad_interval_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"eval.every_steps='often': must be"):
        resolve_every("often", 100, "eval.every_steps")


def test_checkpoints_and_heldout_evals_are_periodic_by_default_and_off_under_debug(tmp_path: Path) -> None:
    cfg = compose_train([], run_dir=tmp_path)
    assert cfg.train.checkpoint_every == "auto" and cfg.eval.every_steps == "auto"
    assert resolve_every(cfg.train.checkpoint_every, 1500, "train.checkpoint_every") == 150
    for preset in ("smoke", "overfit"):
        d = compose_train([f"debug={preset}"], run_dir=tmp_path)
        assert d.train.checkpoint_every is None and d.eval.every_steps is None, preset


def test_train_line_and_csv_rows_carry_the_per_task_loss() -> None:
    line = train_line(REC, 1500)
    assert line == (
        "step 20/1500 | loss 1.2346 | lr 2.500e-04 | 12,346 tok/s | task loss arithmetic 1.5000, counting 0.7500"
    )
    (row,) = train_csv_rows([REC])
    assert row["task_loss/arithmetic"] == 1.5 and row["task_loss/counting"] == 0.75 and "task_loss" not in row
    result = {
        "tasks": {"a": {"n": 2, "loss": 1.0, "token_acc": 0.5, "exact_match": 0.0}},
        "macro": {"loss": 1.0, "token_acc": 0.5, "exact_match": 0.0},
    }
    assert (
        heldin_line(result) == "macro loss 1.0000, token_acc 0.5000, exact_match 0.0000 | task loss a 1.0000"
    )


def test_one_log_format_for_hydra_and_the_other_entry_points() -> None:
    from omegaconf import OmegaConf

    from mtlora.utils.logging import LOG_FORMAT
    from tests.helpers.compose import CONF

    hydra_cfg = OmegaConf.load(CONF / "hydra" / "default.yaml")
    assert hydra_cfg.job_logging.formatters.simple.format == LOG_FORMAT


def test_the_bar_redraws_rarely_off_a_terminal() -> None:
    import io

    from mtlora.run.progress import NON_TTY_INTERVAL, min_interval

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert min_interval(io.StringIO()) == NON_TTY_INTERVAL >= 10
    assert min_interval(Tty()) == 0.1


def test_log_lines_go_above_the_open_bar_and_the_handlers_come_back(capsys) -> None:
    import logging
    import sys

    from mtlora.run.progress import ProgressBar

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    before = list(root.handlers)
    root.addHandler(console)
    try:
        bar = ProgressBar(10, desc="train")
        assert console not in root.handlers  # replaced by a tqdm.write handler with the same format
        logging.getLogger("mtlora.test").warning("hello")
        bar.update(3)
        bar.close()
        bar.close()  # idempotent
        assert console in root.handlers
    finally:
        root.handlers = before
    err = capsys.readouterr().err
    assert "LOG hello\n" in err


def test_the_schedule_line_says_when_the_run_checkpoints_and_evaluates() -> None:
    from mtlora.run.schedule import schedule_line

    assert schedule_line(1500, 150, 150, True) == (
        "1500 optimizer steps; checkpoint: every 150 steps; held-out eval: every 150 steps and at the end"
    )
    assert schedule_line(4, None, None, False) == "4 optimizer steps; checkpoint: none; held-out eval: none"
