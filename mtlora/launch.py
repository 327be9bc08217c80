"""Start training workers with ``accelerate launch`` (the Hydra process composes the config once).

The workers read ``<run_dir>/config_resolved.yaml`` and never run Hydra themselves, so every rank sees
the same config and the same run dir. The rendezvous port is picked free on each launch, so concurrent
jobs (e.g. a multirun) do not collide.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from mtlora.training.deepspeed import write_deepspeed_config
from mtlora.utils.dist import free_port

log = logging.getLogger(__name__)

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
    return [*cmd, "-m", "mtlora.worker", str(run_dir)]


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
    return subprocess.run(cmd, env=worker_env(cfg, os.environ)).returncode


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
