"""``resume=`` never damages the run it was pointed at: compatibility is checked before any file of the run
dir is touched, and a finished run resumed with its own config is left as it is."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from mtlora.load import load_run
from mtlora.train import run
from tests.helpers.compose import compose_train

ARGS = ["debug=smoke", "train.max_steps=2", "train.checkpoint_every=1", "eval=none", "data.budget=32"]


def _snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file of the run dir (logs aside)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.endswith(".log")
    }


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume") / "run"
    run(compose_train(ARGS, run_dir=d), d)
    assert (d / "COMPLETED").exists()
    return d


def test_an_incompatible_resume_of_a_completed_run_touches_nothing(completed: Path) -> None:
    before = _snapshot(completed)
    cfg = compose_train([*ARGS, "adapter.rank=4", "resume=auto"], run_dir=completed)
    with pytest.raises(ConfigError) as err:
        run(cfg, completed)
    assert _snapshot(completed) == before  # COMPLETED, config_resolved.yaml, meta.json as they were
    assert re.search(r"resume=auto: the checkpoint .*step_2 does not fit this config.*shape", str(err.value))
    load_run(completed)  # still a loadable finished run


def test_a_completed_run_resumed_with_its_config_says_so_and_does_nothing(completed: Path, capsys) -> None:
    before = _snapshot(completed)
    run(compose_train([*ARGS, "resume=auto"], run_dir=completed), completed)
    assert "already COMPLETED with this config; nothing to resume" in capsys.readouterr().out
    assert _snapshot(completed) == before


def test_a_completed_run_without_checkpoints_is_not_trained_again_from_scratch(tmp_path: Path) -> None:
    d = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("train.checkpoint_every")] + ["train.checkpoint_every=null"]
    run(compose_train(args, run_dir=d), d)
    before = _snapshot(d)
    with pytest.raises(ConfigError, match="holds a COMPLETED run with another config and no checkpoint"):
        run(compose_train([*args, "train.max_steps=3", "resume=auto"], run_dir=d), d)
    assert _snapshot(d) == before
