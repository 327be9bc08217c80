"""Every command that composes ``conf/train.yaml`` refuses what ``mtlora.train`` refuses, before it reads or
writes anything: keys no preset defines (``+foo=1``), booleans given something else (``flase``), values its
rules refuse, and overrides of groups it does not read (they would be ignored without a word). Each is one
line naming the key, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.compose import run_module


def _line(r) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    return line


@pytest.mark.parametrize(
    ("module", "args", "named"),
    [
        (
            "mtlora.evaluate",
            ["+foo=1", "adapter.use_rslora=flase", "adapter.rank=4"],
            [
                "foo: unknown top-level key",
                "adapter.use_rslora='flase': must be true or false",
                "adapter.rank=4: mtlora.evaluate does not read adapter.rank",
            ],
        ),
        ("mtlora.evaluate", ["eval.batch_size=0"], ["eval.batch_size=0: must be an integer >= 1"]),
        ("mtlora.evaluate", ["allow_incomplete=flase"], ["allow_incomplete='flase'"]),
        (
            "mtlora.diagnose",
            ["+foo=1", "diagnostics.plots=flase", "data=flan2021"],
            [
                "foo: unknown top-level key",
                "diagnostics.plots='flase': must be true or false",
                "data=flan2021: mtlora.diagnose does not read data",
            ],
        ),
        ("mtlora.diagnose", ["allow_incomplete=flase"], ["allow_incomplete='flase'"]),
        (
            "mtlora.count",
            ["+foo=1", "adapter.use_rslora=flase", "+adapter.rnak=4"],
            [
                "foo: unknown top-level key",
                "adapter.use_rslora='flase': must be true or false",
                "adapter.rnak: unknown key",
            ],
        ),
        ("mtlora.count", ["adapter.rank=0"], ["adapter.rank=0: must be an integer >= 1"]),
    ],
)
def test_every_command_refuses_unknown_keys_bad_booleans_and_unread_overrides(
    tmp_path: Path, module: str, args: list[str], named: list[str]
) -> None:
    run = tmp_path / "run"  # refused before the run dir is read: it need not exist
    extra = [] if module == "mtlora.count" else [f"run_dir={run}"]
    line = _line(run_module(module, [*extra, *args], cwd=tmp_path, timeout=300))
    for text in named:
        assert text in line, line
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_base_model_evaluation_refuses_them_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ["adapter=none", f"out={out}", "eval.suites=[heldin]"]
    line = _line(run_module("mtlora.evaluate", [*base, "+eval.foo=1"], cwd=tmp_path, timeout=300))
    assert "eval.foo: unknown key" in line
    line = _line(run_module("mtlora.evaluate", [*base, "data.on_bad_row=Skip"], cwd=tmp_path, timeout=300))
    assert "data.on_bad_row='Skip': must be one of" in line  # the model and data it reads are checked
    assert not out.exists()
