"""Damaged or older run-dir files are named, never a raw parser traceback and never silently trusted: a torn
``config_resolved.yaml`` or ``meta.json``, and an adapter dir saved before checksums were recorded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtlora.cli.errors import describe
from mtlora.diagnose import final_step
from mtlora.errors import IntegrityError
from mtlora.run.checksums import verify
from mtlora.run.rundir import load_resolved_config
from mtlora.train import check_resume
from tests.helpers.compose import compose_train


def test_a_damaged_resolved_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "config_resolved.yaml").write_text("model:\n  name: tiny\n  arch: [unclosed\n")
    with pytest.raises(
        IntegrityError, match=r"config_resolved.yaml is damaged \(cannot be parsed as YAML"
    ) as e:
        load_resolved_config(tmp_path)
    assert str(tmp_path) in describe(e.value)  # a user error: one line naming the file, exit status 2


def test_a_damaged_meta_json_is_named_before_a_resume_claims_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "COMPLETED").write_text("done\n")
    (run / "meta.json").write_text('{"config_hash": "ab')
    cfg = compose_train(["resume=auto"], run_dir=run)
    with pytest.raises(IntegrityError, match=r"meta.json is damaged"):
        check_resume(cfg, run)
    assert sorted(p.name for p in run.iterdir()) == ["COMPLETED", "meta.json"]  # nothing touched
    with pytest.raises(IntegrityError, match=r"meta.json is damaged"):
        final_step(run)  # diagnose's step of the records


def test_an_adapter_dir_without_checksums_loads_with_a_warning(tmp_path: Path, caplog) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        verify(tmp_path)
    assert f"{tmp_path} has no checksums.json" in caplog.text and "parsing only" in caplog.text
