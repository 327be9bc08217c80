"""Run-directory bookkeeping: status markers and the saved config that workers read."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlora.utils.dist import pid_alive
from mtlora.utils.io import atomic_write_text

RESOLVED_CONFIG = "config_resolved.yaml"
MARKERS = ("RUNNING", "COMPLETED", "FAILED")


#: files that make a directory a run dir (any one of them)
RUN_DIR_FILES = (RESOLVED_CONFIG, *MARKERS, "meta.json")
#: a run's own artifacts: no command writes its outputs into them
OWN_SUBDIRS = ("adapter", "base_model", "checkpoints", ".hydra")


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in RUN_DIR_FILES)


def enclosing_run_dir(path: Path) -> Path | None:
    """The run dir that holds ``path`` (``path`` itself or its nearest ancestor that is one), resolved."""
    p = Path(path).resolve()
    return next((d for d in (p, *p.parents) if is_run_dir(d)), None)


def check_output_dir(out: Path, own: Path | None, key: str = "out", allow_root: bool = True) -> Path:
    """Refuse an output dir that would overwrite a run's files: one inside a run dir other than ``own``
    (the run being evaluated / exported / recorded), inside any run's own artifacts (:data:`OWN_SUBDIRS`:
    ``adapter/``, ``checkpoints/`` ...), or, with ``allow_root=False``, the run dir itself. Returns ``out``."""
    from mtlora.errors import ConfigError

    run = enclosing_run_dir(out)
    if run is None:
        return out
    own_run = None if own is None else Path(own).resolve()
    if run != own_run:
        raise ConfigError(
            f"{key}={out} is inside the run dir {run} (another run than "
            f"{own if own is not None else 'this command writes'}); writing there would replace that run's "
            f"files: choose an {key} outside other runs"
        )
    rel = Path(out).resolve().relative_to(run).parts
    if rel and rel[0] in OWN_SUBDIRS:
        raise ConfigError(
            f"{key}={out} is inside the run's own {rel[0]}/, which no output may replace: choose another {key}"
        )
    if not rel and not allow_root:
        raise ConfigError(f"{key}={out} is the run dir itself: choose a subdir (the default) or another dir")
    return out


class RunDirBusy(RuntimeError):
    """The run dir is used by another (or an unfinished) run and ``resume`` was not asked for."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def claim(run_dir: Path, resume: str | None) -> None:
    """Create ``RUNNING`` atomically. Fails if the dir already holds a run, unless resuming."""
    run_dir.mkdir(parents=True, exist_ok=True)
    present = [m for m in MARKERS if (run_dir / m).exists()]
    if present and resume is None:
        raise RunDirBusy(
            f"{run_dir} already holds a run ({', '.join(present)}); pass resume=auto to continue it "
            f"or choose another hydra.run.dir"
        )
    running = run_dir / "RUNNING"
    if resume is not None and running.exists():
        m = re.search(r"pid=(\d+) host=(\S+)", running.read_text())
        if m and m[2] == socket.gethostname() and int(m[1]) != os.getpid() and pid_alive(int(m[1])):
            raise RunDirBusy(f"{run_dir} is being trained by the live process {m[1]}; not resuming into it")
        running.unlink()
    for marker in ("COMPLETED", "FAILED"):
        (run_dir / marker).unlink(missing_ok=True)
    try:
        fd = os.open(run_dir / "RUNNING", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError as e:
        raise RunDirBusy(f"{run_dir}: another process claimed this run dir at the same moment") from e
    with os.fdopen(fd, "w") as f:
        f.write(f"{_now()} pid={os.getpid()} host={socket.gethostname()}\n")


def finish(run_dir: Path, ok: bool, message: str = "") -> None:
    """Replace ``RUNNING`` by ``COMPLETED`` or ``FAILED`` (with the time and a message)."""
    atomic_write_text(run_dir / ("COMPLETED" if ok else "FAILED"), f"{_now()}\n{message}\n")
    (run_dir / "RUNNING").unlink(missing_ok=True)


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    path = run_dir / RESOLVED_CONFIG
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def load_resolved_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a mtlora run dir?")
    return OmegaConf.load(path)
