"""Compose the real ``conf/train.yaml`` the way ``python -m mtlora.train`` does, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from mtlora.config.compose import compose_train_config
from mtlora.utils.paths import default_data_dir

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
DATA_DIR = default_data_dir()


def compose_train(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The composed train config with ``overrides``; ``paths.output_dir`` set to ``run_dir``
    (:func:`mtlora.config.compose.compose_train_config`)."""
    return compose_train_config(overrides, run_dir)


def run_module(module: str, args: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None):
    """Run ``python -m <module> <args>`` in a subprocess; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None):
    """Run ``python -m mtlora.train <args>``."""
    return run_module("mtlora.train", args, cwd=cwd, timeout=timeout, env=env)
