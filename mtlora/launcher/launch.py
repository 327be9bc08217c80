"""Start training workers with ``accelerate launch`` (the Hydra process composes the config once).

The workers read ``<run_dir>/config_resolved.yaml`` and never run Hydra themselves, so every rank sees
the same config and the same run dir. The rendezvous port is picked free on each launch, so concurrent
jobs (e.g. a multirun) do not collide.

``accelerate launch`` and its workers run in a process group of their own. When this process is stopped
(SIGTERM, Ctrl-C, any error while waiting), the whole group gets SIGTERM, then SIGKILL after
:data:`STOP_GRACE_S` seconds, and this process returns only once every worker is gone: the caller marks the
run ``FAILED`` after the last write into it, never before. Each worker also holds a writer lock on the run
dir (:class:`mtlora.run.rundir.WriterLock`), checked against this launch's claim (``MTLORA_RUN_CLAIM``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from mtlora.run.rundir import CLAIM_ENV, claim_id
from mtlora.training.deepspeed import write_deepspeed_config
from mtlora.utils.dist import free_port

log = logging.getLogger(__name__)

#: seconds the workers get to exit after SIGTERM before the group is killed
STOP_GRACE_S = 30.0
#: the workers' environment for DeepSpeed on the CPU (hardware=cpu2_zero*)
CPU_DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def worker_command(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The ``accelerate launch`` argv for ``cfg.hardware`` (``hardware.num_processes`` is per machine).

    DeepSpeed presets (``hardware.deepspeed``) add ``--use_deepspeed`` (the ZeRO config itself reaches the
    workers through ``DeepSpeedPlugin(hf_ds_config=...)``, see :mod:`mtlora.training.deepspeed`); several
    machines add ``--num_machines/--machine_rank/--main_process_ip`` and use the configured port (the
    rendezvous must agree across nodes), and DeepSpeed then uses torchrun on each node
    (``--deepspeed_multinode_launcher standard``: no pdsh, no ``--local_rank`` argument)."""
    hw = cfg.hardware
    machines = int(hw.get("num_machines") or 1)
    per_machine = int(hw.num_processes)
    port = hw.get("main_process_port") if machines > 1 else None
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(per_machine * machines),
        "--num_machines",
        str(machines),
    ]
    if machines > 1:
        cmd += ["--machine_rank", str(int(hw.machine_rank)), "--main_process_ip", str(hw.main_process_ip)]
    cmd += [
        "--main_process_port",
        str(int(port) if port else free_port()),
        "--mixed_precision",
        "bf16" if cfg.train.precision == "bf16" else "no",
        "--dynamo_backend",
        "no",
    ]
    if hw.get("deepspeed"):
        cmd.append("--use_deepspeed")
        if machines > 1:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif per_machine * machines > 1:
        # accelerate's torchrun-based launcher; on the CPU the workers' Accelerator(cpu=True) joins a
        # gloo process group (`--cpu` here would select accelerate's single-process/MPI launcher)
        cmd.append("--multi_gpu")
    elif hw.device == "cpu":
        cmd.append("--cpu")
    if hw.get("num_threads"):
        cmd += ["--num_cpu_threads_per_process", str(hw.num_threads)]
    return [*cmd, "-m", "mtlora.launcher.worker", str(run_dir)]


def spawn_workers(cfg: DictConfig, run_dir: Path) -> int:
    """Run this machine's workers to completion; returns their exit code. Machine 0 writes the DeepSpeed
    config and ``launch_command.txt``; another machine ``k`` of a multi-node job writes
    ``launch_command.node<k>.txt`` only."""
    cmd = worker_command(cfg, run_dir)
    node = int(cfg.hardware.get("machine_rank") or 0)
    if node == 0:
        write_deepspeed_config(cfg, run_dir)  # <run_dir>/deepspeed_config.json (DeepSpeed presets only)
    (run_dir / ("launch_command.txt" if node == 0 else f"launch_command.node{node}.txt")).write_text(
        " ".join(cmd) + "\n"
    )
    log.info("launching %d workers: %s", cfg.hardware.num_processes, " ".join(cmd))
    env = worker_env(cfg, os.environ)
    claim = claim_id(run_dir)
    if claim:
        env[CLAIM_ENV] = claim
    return run_process_group(cmd, env)


def run_process_group(cmd: list[str], env: Mapping[str, str], grace_s: float = STOP_GRACE_S) -> int:
    """Run ``cmd`` in a new process group and wait for it; returns its exit code. If the wait is
    interrupted (SIGTERM turned into SystemExit, KeyboardInterrupt, ...), stop the whole group (SIGTERM,
    SIGKILL after ``grace_s``), wait until it is gone, and re-raise."""
    proc = subprocess.Popen(cmd, env=dict(env), start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        stop_process_group(proc, grace_s)
        raise


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``grace_s``; returns when the group is empty."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
    try:
        _stop(proc, pgid, grace_s)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen, pgid: int, grace_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        log.warning("sent %s to the workers' process group %d", sig.name, pgid)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(pgid, grace_s if sig == signal.SIGTERM else 10.0):
            break


def _group_alive(pgid: int, timeout_s: float) -> bool:
    """Whether processes of group ``pgid`` remain after waiting up to ``timeout_s`` for them to exit
    (the leader has exited; workers may still be finishing their ``finally`` blocks)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def worker_env(cfg: DictConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The workers' environment: ``environ`` without a stale ``WORLD_SIZE``, unbuffered output, and for
    DeepSpeed on the CPU ``DS_ACCELERATOR=cpu`` with no visible GPU (on a machine that has one, DeepSpeed and
    Accelerate would otherwise pick CUDA)."""
    env = dict(environ)
    env.pop("WORLD_SIZE", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cfg.hardware.get("deepspeed") and cfg.hardware.device == "cpu":
        env |= CPU_DEEPSPEED_ENV
    return env
