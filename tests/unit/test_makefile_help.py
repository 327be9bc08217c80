"""``make help``: every documented target is listed, the table pattern target included, and piped output
carries no terminal colour codes."""

from __future__ import annotations

import re
import subprocess

from tests.helpers.compose import REPO


def _help() -> str:
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout


def test_help_lists_every_documented_target_including_the_table_pattern() -> None:
    text = _help()
    documented = re.findall(r"^([a-zA-Z_%-]+):.*?## ", (REPO / "Makefile").read_text(), flags=re.M)
    assert "table-%" in documented
    listed = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert listed == {t.replace("%", "<paper>-<table>") for t in documented}


def test_piped_help_has_no_colour_codes() -> None:
    assert "\x1b[" not in _help()
