"""Hydra callbacks for multiruns (registered in ``conf/hydra/default.yaml``), and the rerun of failed jobs.

* :class:`FailedJobsCallback`: at the end of a multirun, lists the jobs whose run dir holds ``FAILED`` (or a
  ``RUNNING`` left by a killed job) with their overrides, writes ``<sweep dir>/failed_jobs.txt`` and makes
  the multirun exit non-zero. ``mtlora.train`` turns a job's exception into a ``FAILED`` marker and a
  failure value in multiruns, so the other jobs still run.
* :class:`PinGpuPerWorker`: under the joblib launcher (``hydra/launcher=gpu_pack``), pins each worker
  process to its own GPU for its whole life, before the job touches CUDA.

``failed_jobs.txt`` holds one line per failed job: its overrides, shell-quoted, then
``hydra.run.dir=<its run dir>``; ``python -m mtlora.train $LINE hydra.mode=RUN resume=auto`` reruns it in
place. ``python -m mtlora.run.callbacks rerun SWEEP_DIR`` (``make rerun-failed SWEEP=...``) does that for
every line, one job after another, and rewrites the file with the jobs that failed again;
``python -m mtlora.run.callbacks list SWEEP_DIR`` rebuilds the file from the markers (e.g. after a
launcher gave up before the end of the multirun).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mtlora.utils.io import atomic_write_text

log = logging.getLogger(__name__)

FAILED_JOBS = "failed_jobs.txt"
_HEADER = (
    "# failed jobs of this sweep, one per line: overrides + hydra.run.dir; rerun: "
    "make rerun-failed SWEEP=<this dir>  (= python -m mtlora.train $LINE hydra.mode=RUN resume=auto)\n"
)


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, list[str], str]]:
    """``(run dir, overrides, reason)`` of every job under ``sweep_dir`` that did not complete: a ``FAILED``
    marker, or a ``RUNNING`` one with no ``COMPLETED`` (a job killed before it could mark itself)."""
    out = []
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        job = hydra_dir.parent.parent
        if (job / "COMPLETED").exists():
            continue
        if (job / "FAILED").exists():
            lines = (job / "FAILED").read_text().splitlines()
            reason = lines[1] if len(lines) > 1 else "failed"
        elif (job / "RUNNING").exists():
            reason = "RUNNING marker left behind (the job was killed)"
        else:
            continue
        overrides = [o for o in yaml.safe_load(hydra_dir.read_text()) or [] if not o.startswith("resume=")]
        out.append((job, overrides, reason))
    return out


def _line(job: Path, overrides: list[str]) -> str:
    return shlex.join([*overrides, f"hydra.run.dir={job}"])


def write_failed_jobs(sweep_dir: Path) -> list[tuple[Path, list[str], str]]:
    """Scan ``sweep_dir``, print the failed jobs and write ``failed_jobs.txt`` (removed when none failed)."""
    jobs = failed_jobs(sweep_dir)
    path = Path(sweep_dir) / FAILED_JOBS
    if not jobs:
        path.unlink(missing_ok=True)
        return jobs
    atomic_write_text(path, _HEADER + "".join(_line(job, ovr) + "\n" for job, ovr, _ in jobs))
    print(f"\n{len(jobs)} job(s) of the sweep {sweep_dir} failed:", flush=True)
    for job, overrides, reason in jobs:
        print(f"  {job}\n    overrides: {' '.join(overrides)}\n    error: {reason[:300]}", flush=True)
    print(f"listed in {path}; rerun them with: make rerun-failed SWEEP={sweep_dir}", flush=True)
    return jobs


class FailedJobsCallback(Callback):
    """Lists the failed jobs at the end of a multirun (stdout and ``failed_jobs.txt``) and then exits with
    ``exit_code`` when there were any (0: exit normally)."""

    def __init__(self, exit_code: int = 1) -> None:
        self.exit_code = exit_code
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))  # resolved once, as the sweeper does

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir() and write_failed_jobs(sweep_dir) and self.exit_code:
            sys.exit(self.exit_code)


# --- one GPU per joblib worker ------------------------------------------------------------------------

_SLOTS_ENV = "MTLORA_GPU_SLOTS_DIR"
_DEVICES_ENV = "MTLORA_SWEEP_CUDA_VISIBLE_DEVICES"
_slot: tuple[int, Any] | None = None  # (slot, open locked file): held for the life of the worker


def claim_gpu_slot(n_slots: int, lock_dir: Path) -> int | None:
    """The first of ``n_slots`` slots whose lock file this process can lock (kept for its lifetime; the
    OS releases it when the process exits), or the slot it already holds; None when all are taken."""
    global _slot
    if _slot is not None:
        return _slot[0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_slots):
        f = open(lock_dir / f"slot{i}", "a+")  # noqa: SIM115 (kept open: the lock lives with the process)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"pid={os.getpid()}\n")
        f.flush()
        _slot = (i, f)
        return i
    return None


class PinGpuPerWorker(Callback):
    """Under the joblib launcher, set ``CUDA_VISIBLE_DEVICES`` of each worker process to one GPU: worker
    slot i gets the i-th device of the ``CUDA_VISIBLE_DEVICES`` the sweep started with (GPU i when unset).
    Only for single-process CUDA jobs (``hardware.device=cuda``, ``hardware.num_processes=1``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # runs in the sweep process before the launcher starts its workers, which inherit the environment
        os.environ[_SLOTS_ENV] = tempfile.mkdtemp(prefix=f"mtlora-gpu-slots-{os.getpid()}-")
        os.environ[_DEVICES_ENV] = os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        hw = config.get("hardware")
        if "JoblibLauncher" not in launcher or hw is None or _SLOTS_ENV not in os.environ:
            return
        if hw.get("device") != "cuda" or int(hw.get("num_processes", 1)) != 1:
            return
        n = int(config.hydra.launcher.n_jobs)
        slot = claim_gpu_slot(n, Path(os.environ[_SLOTS_ENV]))
        if slot is None:
            slot = int(config.hydra.job.num) % n
            log.warning("no free GPU slot of %d for this worker; using job number modulo: %d", n, slot)
        devices = [d for d in os.environ.get(_DEVICES_ENV, "").split(",") if d.strip()]
        device = devices[slot % len(devices)] if devices else str(slot)
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info(
            "job %s pinned to GPU %s (worker slot %d, pid %d)",
            config.hydra.job.num,
            device,
            slot,
            os.getpid(),
        )


# --- rerun ----------------------------------------------------------------------------------------------


def rerun_failed(sweep_dir: Path, dry_run: bool = False, extra: list[str] | None = None) -> int:
    """Rerun every line of ``<sweep_dir>/failed_jobs.txt`` (built from the markers when missing) as a single
    run in its own run dir with ``resume=auto``; rewrite the file with the jobs that failed again.
    Returns the number of jobs that failed again."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / FAILED_JOBS
    if not path.exists():
        write_failed_jobs(sweep_dir)
    lines = (
        [x for x in path.read_text().splitlines() if x.strip() and not x.startswith("#")]
        if path.exists()
        else []
    )
    if not lines:
        print(f"no failed jobs in {sweep_dir}")
        return 0
    still = []
    for i, line in enumerate(lines, 1):
        cmd = [
            sys.executable,
            "-m",
            "mtlora.train",
            *shlex.split(line),
            "hydra.mode=RUN",
            "resume=auto",
            *(extra or []),
        ]
        print(f"[{i}/{len(lines)}] {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        if subprocess.run(cmd).returncode != 0:
            still.append(line)
    if dry_run:
        return 0
    if still:
        atomic_write_text(path, _HEADER + "".join(x + "\n" for x in still))
        print(f"{len(still)} of {len(lines)} job(s) failed again; listed in {path}")
    else:
        path.unlink()
        print(f"all {len(lines)} rerun job(s) completed")
    return len(still)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtlora.run.callbacks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "action", choices=["list", "rerun"], help="list: (re)write failed_jobs.txt; rerun: rerun them"
    )
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="extra overrides for every rerun job")
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        p.error(f"{a.sweep_dir} is not a directory")
    if a.action == "list":
        jobs = write_failed_jobs(a.sweep_dir)
        if not jobs:
            print(f"no failed jobs in {a.sweep_dir}")
        return 0
    return 1 if rerun_failed(a.sweep_dir, a.dry_run, a.overrides) else 0


if __name__ == "__main__":
    from mtlora.cli.entry import run_main

    sys.exit(run_main(main))  # a user error: one line, exit status 2
