"""``resume=`` never damages the run it was pointed at: compatibility is checked before any file of the run
dir is touched, and a finished run resumed with its own config is left as it is."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

import mtlora.errors
from mtlora.errors import ConfigError
from mtlora.train import run
from mtlora.trained_run import load_run
from mtlora.training.checkpoint import list_checkpoints, resolve_resume
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


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpts") / "run"
    args = [*[a for a in ARGS if not a.startswith("train.max_steps")], "train.max_steps=3"]
    run(compose_train([*args, "train.keep_checkpoints=3"], run_dir=d), d)
    assert [p.name for p in list_checkpoints(d)] == ["step_1", "step_2", "step_3"]
    return d


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ("truncate", "adapter_model.safetensors"),
        ("truncate", "trainer_state.json"),
        ("flip", "optimizer.safetensors"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_used(
    three_checkpoints: Path, tmp_path: Path, caplog, damage: str, file: str
) -> None:
    d = Path(shutil.copytree(three_checkpoints, tmp_path / "run"))
    path = d / "checkpoints" / "step_3" / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-8] + bytes(8))
    with caplog.at_level(logging.WARNING, logger="mtlora.training.checkpoint"):
        assert resolve_resume("auto", d) == d / "checkpoints" / "step_2"
    assert f"{path} is damaged" in caplog.text and "step_2, the newest intact checkpoint" in caplog.text
    with pytest.raises(mtlora.errors.IntegrityError, match=rf"{path} is damaged"):
        resolve_resume(str(d / "checkpoints" / "step_3"), d)  # asked for by path: no fallback
    (d / "COMPLETED").unlink()  # as if the run had been killed after its last save
    run(
        compose_train(
            [*ARGS[:1], "train.max_steps=3", *ARGS[2:], "train.keep_checkpoints=3", "resume=auto"], d
        ),
        d,
    )
    assert (d / "COMPLETED").exists()
    assert [json.loads(x)["step"] for x in (d / "metrics" / "train.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_every_checkpoint_damaged_is_an_error_naming_them(three_checkpoints: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(three_checkpoints, tmp_path / "run"))
    for p in list_checkpoints(d):
        (p / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(
        mtlora.errors.IntegrityError, match="every checkpoint of .* is damaged.*step_3.*step_1"
    ):
        resolve_resume("auto", d)
