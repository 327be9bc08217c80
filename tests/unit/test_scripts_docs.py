"""The GPU-check scripts and the benchmark notes describe what they are (checks for a GPU machine without
network), not one particular machine or its limits, and no script edits git's own files."""

from __future__ import annotations

import re

import pytest

from tests.helpers.compose import REPO

DOCS = ("scripts/README.md", "docs/benchmarks.md", "scripts/device_check.sh", "scripts/device_wheels.sh")
# internal bookkeeping that a reader of the repository cannot follow
FOREIGN = re.compile(r"\b(issue \d+|issue's|lent|this session|device\s+time)\b|carry=", re.I)


@pytest.mark.parametrize("rel", DOCS)
def test_docs_speak_of_the_project_only(rel: str) -> None:
    hits = [
        f"{rel}:{n}: {ln}"
        for n, ln in enumerate((REPO / rel).read_text().splitlines(), 1)
        if FOREIGN.search(ln)
    ]
    assert hits == []


def test_no_script_edits_git_files() -> None:
    for path in sorted((REPO / "scripts").iterdir()):
        if path.suffix in (".sh", ".py"):
            assert ".git/" not in path.read_text(), path.name
