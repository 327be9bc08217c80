"""Validation imports no torch, transformers or datasets at module level: ``--help``, ``--cfg job`` and the
config checks stay fast, and the heavy packages load only where a model or dataset is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets")


def heavy_after_import(module: str) -> list[str]:
    """The heavy packages in ``sys.modules`` after ``import <module>`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize(
    "module",
    [
        "mtlora.config",
        "mtlora.config.checker",
        "mtlora.config.compose",
        "mtlora.config.reference",
        "mtlora.config.train_rules",
        "mtlora.config.data_rules",
        "mtlora.config.alignment_rules",
        "mtlora.config.eval_rules",
        "mtlora.config.hardware_rules",
        "mtlora.config.run_rules",
        "mtlora.config.cross_rules",
        "mtlora.data.selection",
        "mtlora.data.batching",
        "mtlora.models.dtypes",
    ],
)
def test_rule_modules_import_without_heavy_packages(module: str) -> None:
    assert heavy_after_import(module) == []


def test_validate_imports_without_heavy_packages() -> None:
    assert heavy_after_import("mtlora.config.validate") == []
