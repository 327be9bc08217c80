"""``meta.json``: what ran, where, with which code and packages."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtlora.run.checksums import read_json
from mtlora.utils.io import atomic_write_text
from mtlora.utils.resolvers import REPO_ROOT

PACKAGES = (
    "mtlora",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "tokenizers",
    "peft",
    "wandb",
    "numpy",
)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config without ``resume`` (which differs between a run and its resumption)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _launch_info(cfg: DictConfig) -> dict[str, Any]:
    """When, how and from which code and config this process was launched."""
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(),
        "command": [sys.executable, *sys.argv],
        "git_sha": _git("rev-parse", "HEAD"),
        "config_hash": config_hash(cfg),
    }


def record_resume(run_dir: Path, cfg: DictConfig) -> None:
    """Append this launch to ``meta.json``'s ``resumes`` and make its config hash the current one."""
    path = run_dir / "meta.json"
    if not path.exists():
        return
    meta = read_json(path)
    info = _launch_info(cfg)
    meta.setdefault("resumes", []).append(info)
    meta["config_hash"] = info["config_hash"]
    atomic_write_text(path, json.dumps(meta, indent=2, default=str))


def write_meta(run_dir: Path, cfg: DictConfig, **extra: Any) -> dict:
    """Write ``meta.json`` (merged into an existing one, so workers can add parameter counts later)."""
    path = run_dir / "meta.json"
    meta = read_json(path) if path.exists() else {}
    if not meta:
        status = _git("status", "--porcelain")
        info = _launch_info(cfg)
        meta = {
            "created": info.pop("time"),
            **info,
            "git_dirty": bool(status) if status is not None else None,
            "packages": package_versions(),
            "hardware": hardware_info(),
        }
    meta.update(extra)
    atomic_write_text(path, json.dumps(meta, indent=2, default=str))
    return meta
