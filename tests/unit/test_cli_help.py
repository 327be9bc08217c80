"""``--help`` of the Hydra entry points is rendered without composing a config
(:mod:`mtlora.cli.help`), and must be exactly the text Hydra's own ``--help`` prints from the same template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtlora.cli.help import config_groups, render_help, wants_help
from tests.helpers.compose import REPO, run_module

#: entry module -> the help template it selects (conf/hydra/help/<name>.yaml)
COMMANDS = {
    "mtlora.train": "train",
    "mtlora.evaluate": "evaluate",
    "mtlora.diagnose": "diagnose",
    "mtlora.count": "count",
}


def hydra_help(module: str) -> str:
    """What Hydra itself prints for ``python -m <module> --help``: the module's ``__main__`` block without
    the fast path (its argv defaults applied, then its Hydra ``main``)."""
    code = (
        "import sys, importlib\n"
        f"m = importlib.import_module({module!r})\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "for name in ('with_defaults', '_with_defaults'):\n"
        "    if hasattr(m, name): sys.argv = getattr(m, name)(sys.argv)\n"
        "if hasattr(m, 'split_argv'): sys.argv, _ = m.split_argv(sys.argv)\n"
        "m.main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("module", list(COMMANDS))
def test_fast_help_is_hydras_help(module: str, tmp_path: Path) -> None:
    fast = run_module(module, ["--help"], cwd=tmp_path)
    assert fast.returncode == 0, fast.stderr[-2000:]
    assert fast.stdout == hydra_help(module)
    assert fast.stdout == render_help(COMMANDS[module]) + "\n"


def test_config_groups_walk_nested_groups_in_hydras_order(tmp_path: Path) -> None:
    for rel in ("a/x.yaml", "a/b/z.yaml", "a/b/y.yaml", "ab/w.yaml", "hydra/help/h.yaml", "empty/.keep"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    assert config_groups(tmp_path) == "a: x\na/b: y, z\nab: w\n"


def test_only_help_flags_ask_for_help() -> None:
    assert wants_help(["adapter=dora", "--help"]) and wants_help(["-h"])
    assert not wants_help(["--hydra-help"]) and not wants_help(["help=1"]) and not wants_help([])
