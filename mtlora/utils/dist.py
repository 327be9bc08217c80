"""Process-rank facts read from the environment (set by ``accelerate launch`` / ``torchrun``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys


def env_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def launched_as_worker() -> bool:
    """True when this process was started by a distributed launcher (it has a ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what torchrun sends the other ranks when one fails, and what schedulers send before
    a kill) into ``SystemExit(143)`` so that ``finally`` blocks run: markers, closing the wandb run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_device(device: str, key: str = "hardware.device", processes: int = 1) -> None:
    """Raise :class:`~mtlora.errors.ConfigError` when ``device`` (``cpu``, ``cuda``, ``cuda:N``) is not on
    this machine, or when ``processes`` ranks ask for more GPUs than are visible: a run never falls back
    to another device than the one asked for."""
    import torch

    from mtlora.errors import ConfigError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ConfigError(f"{key}={device!r}: must be cpu, cuda or cuda:N")
    if not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={device}: no CUDA device is available on this machine (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use {key}=cpu or run where "
            "a GPU is visible"
        )
    count = torch.cuda.device_count()
    index = int(str(device).split(":", 1)[1]) if ":" in str(device) else 0
    if index >= count or processes > count:
        raise ConfigError(
            f"{key}={device} with {processes} process(es): this machine has {count} visible CUDA device(s)"
        )
