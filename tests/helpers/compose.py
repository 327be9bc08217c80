"""Compose the real ``conf/train.yaml`` the way ``python -m mtlora.train`` does, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mtlora.utils.paths import default_data_dir
from mtlora.utils.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
DATA_DIR = default_data_dir()


def compose_train(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The composed train config with ``overrides``; ``paths.output_dir`` set to ``run_dir``."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=True)
    if run_dir is not None:
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves against this instance
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


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
