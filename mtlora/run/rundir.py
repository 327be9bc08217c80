"""Run-directory bookkeeping: the claim lock, status markers and the saved config that workers read.

A run dir is claimed by an exclusive ``flock`` on ``<run_dir>/.lock``, held by the process that claimed it
(the Hydra process) until it marks the run finished, and every process that writes into the run (training
workers) holds a lock on its own file ``<run_dir>/.writers/<host>-<pid>`` for as long as it lives. A new
claim is refused while either kind is held, so a run dir has one writing launch at a time even when the
claiming process was killed and its workers still run. The OS drops the locks of a process that dies
(also on ``kill -9``), so nothing stale is left to clean up. ``RUNNING`` (pid and host) stays as the
human-readable status and guards run dirs shared between hosts.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import re
import socket
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlora.run.layout import OWN_SUBDIRS
from mtlora.utils.dist import pid_alive
from mtlora.utils.io import atomic_write_text

RESOLVED_CONFIG = "config_resolved.yaml"
MARKERS = ("RUNNING", "COMPLETED", "FAILED")


#: files that make a directory a run dir (any one of them)
RUN_DIR_FILES = (RESOLVED_CONFIG, *MARKERS, "meta.json")


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


LOCK_FILE = ".lock"
WRITERS_DIR = ".writers"
#: the claim id a launch passes to its workers (they check that the run dir is still claimed by it)
CLAIM_ENV = "MTLORA_RUN_CLAIM"
_claims: dict[Path, tuple[int, str]] = {}  # run dir -> (fd of the held .lock, claim id)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def _lock_claim(run_dir: Path) -> str:
    """Take the exclusive claim lock of ``run_dir`` (kept until :func:`release_claim`); returns its id."""
    key = run_dir.resolve()
    if key in _claims:  # this process holds it already (e.g. a base-model evaluation rerun)
        return _claims[key][1]
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirBusy(
            f"{run_dir} is claimed by a live process{_holder(path)}; wait for it to end or choose another "
            "hydra.run.dir"
        ) from None
    claim_id = uuid.uuid4().hex
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()} host={socket.gethostname()} claim={claim_id}\n".encode())
    _claims[key] = (fd, claim_id)
    return claim_id


def release_claim(run_dir: Path) -> None:
    """Drop this process's claim lock of ``run_dir`` (no-op when it holds none)."""
    held = _claims.pop(Path(run_dir).resolve(), None)
    if held is not None:
        os.close(held[0])  # closing the descriptor releases the flock


def claim_id(run_dir: Path) -> str | None:
    held = _claims.get(Path(run_dir).resolve())
    return None if held is None else held[1]


def _check_writers(run_dir: Path) -> None:
    """Raise :class:`RunDirBusy` while a writer of an earlier launch lives; remove the files of dead ones."""
    wdir = run_dir / WRITERS_DIR
    if not wdir.is_dir():
        return
    for path in sorted(wdir.iterdir()):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirBusy(
                f"{run_dir}: a process of an earlier launch still writes into it ({path.name}); stop it "
                "(or wait for it to end) before starting another run there"
            ) from None
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)


class WriterLock:
    """Held by a process that writes into a run dir, for its lifetime (see the module doc)."""

    def __init__(self, run_dir: Path) -> None:
        wdir = Path(run_dir) / WRITERS_DIR
        wdir.mkdir(parents=True, exist_ok=True)
        self.path = wdir / f"{socket.gethostname()}-{os.getpid()}"
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
        expected = os.environ.get(CLAIM_ENV)
        if expected and f"claim={expected}" not in _holder(Path(run_dir) / LOCK_FILE):
            self.release()
            raise RunDirBusy(
                f"{run_dir} is no longer claimed by the launch that started this worker (it ended, and "
                "another launch may have claimed it); not writing into it"
            )

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def claim(run_dir: Path, resume: str | None) -> None:
    """Take the claim lock, then create ``RUNNING`` atomically. Fails while another process holds the run
    dir (claim lock or a live writer), and if the dir already holds a run, unless resuming."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock_claim(run_dir)
    try:
        _claim_markers(run_dir, resume)
    except BaseException:
        release_claim(run_dir)
        raise


def _claim_markers(run_dir: Path, resume: str | None) -> None:
    _check_writers(run_dir)
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
    """Replace ``RUNNING`` by ``COMPLETED`` or ``FAILED`` (with the time and a message), then release the
    claim lock (if this process holds it)."""
    atomic_write_text(run_dir / ("COMPLETED" if ok else "FAILED"), f"{_now()}\n{message}\n")
    (run_dir / "RUNNING").unlink(missing_ok=True)
    release_claim(run_dir)


def settle_staged_log(owner: bool) -> None:
    """Hydra's job log is staged as ``<name>.log.pending-<pid>`` (conf/hydra/default.yaml): when the launch
    owns its run dir (``owner``), append what was logged so far to ``<name>.log`` and log there from now on;
    else drop it, so that a refused launch never appends to the log of the run it found there."""
    from mtlora.utils.resolvers import STAGED_SUFFIX

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) or STAGED_SUFFIX not in handler.baseFilename:
            continue
        staged = Path(handler.baseFilename)
        handler.acquire()
        try:
            handler.close()  # flushed; the next record reopens baseFilename (append mode)
            if owner and staged.exists():
                with open(staged.with_name(staged.name.split(STAGED_SUFFIX)[0]), "ab") as f:
                    f.write(staged.read_bytes())
            handler.baseFilename = str(staged.with_name(staged.name.split(STAGED_SUFFIX)[0]))
            if not owner:
                handler.baseFilename = os.devnull
            staged.unlink(missing_ok=True)
        finally:
            handler.release()


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    path = run_dir / RESOLVED_CONFIG
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def load_resolved_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a mtlora run dir?")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's ScannerError / ParserError, UnicodeDecodeError
        from mtlora.errors import IntegrityError

        raise IntegrityError(
            f"{path} is damaged (cannot be parsed as YAML: {' '.join(str(e).split())})"
        ) from e
    if not isinstance(cfg, DictConfig):
        from mtlora.errors import IntegrityError

        raise IntegrityError(f"{path} is damaged (not a mapping of config groups)")
    return cfg
