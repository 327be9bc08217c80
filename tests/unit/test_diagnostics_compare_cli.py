"""``python -m mtlora.diagnostics.compare`` on a run dir without diagnostics: one line naming the file and
the command that writes it (quoted so that a multirun job dir, ``<n>_<key>=<value>,...``, parses), exit 2."""

from __future__ import annotations

import shlex
from pathlib import Path

from mtlora.cli.entry import EXIT_USER_ERROR
from mtlora.diagnostics.compare import diagnose_command
from tests.helpers.compose import run_module


def test_a_run_without_diagnostics_is_one_line_naming_the_file(tmp_path: Path) -> None:
    a, b = tmp_path / "0_adapter.rank=2,seed=1", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    r = run_module("mtlora.diagnostics.compare", [str(a), str(b)], cwd=tmp_path)
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert f"{a}/metrics/diagnostics.jsonl does not exist" in lines[0]
    assert diagnose_command(a) in lines[0]


def test_the_suggested_command_quotes_hydra_syntax() -> None:
    assert diagnose_command("/runs/r1") == "python -m mtlora.diagnose run_dir=/runs/r1"
    argv = shlex.split(diagnose_command("/m/0_adapter.rank=2,seed=1"))
    assert argv[3] == "run_dir='/m/0_adapter.rank=2,seed=1'"  # one shell word; Hydra reads a quoted string
