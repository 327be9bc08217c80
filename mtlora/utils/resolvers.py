"""OmegaConf resolvers used by ``conf/`` (registered once, at import of :mod:`mtlora.train`)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from mtlora.utils.dist import env_rank
from mtlora.utils.paths import REPO_ROOT, default_data_dir, project_root

__all__ = ["REPO_ROOT", "register_resolvers"]


def _rank_subdir(name: str = ".hydra") -> str:
    # Every rank of a direct `accelerate launch -m mtlora.train` runs Hydra; only rank 0 may write
    # `.hydra/`, the others write to their own folder so the saved config is never garbled.
    rank = env_rank()
    return name if rank == 0 else f"{name}_rank{rank}"


#: the Hydra output subdir of a launch is staged under this suffix and moved to its name once the launch
#: owns the run dir (mtlora.train.settle_hydra_output): a refused launch never replaces another's .hydra/
STAGED_SUFFIX = ".pending-"


def _staged_subdir(name: str = ".hydra") -> str | None:
    # other ranks of a direct `accelerate launch` write no Hydra record: they cannot know whether their
    # launch owns the run dir (rank 0 claims it), and rank 0's record holds the same overrides
    return f"{name}{STAGED_SUFFIX}{os.getpid()}" if env_rank() == 0 else None


def _staged_log(path: str) -> str:
    # the job log: staged like the Hydra record (mtlora.run.rundir.settle_staged_log), none for other ranks
    return f"{path}{STAGED_SUFFIX}{os.getpid()}" if env_rank() == 0 else os.devnull


def _rank_suffix() -> str:
    rank = env_rank()
    return "" if rank == 0 else f".rank{rank}"


def _num_tasks(tasks, select) -> int:
    # the number of tasks of the data mixture (data.select restricts it): task-aware adapters size their
    # per-task parameters with it
    return len(select) if select else len(tasks or {})


def register_resolvers() -> None:
    """Register the ``mtlora.*`` resolvers (idempotent)."""
    table = {
        "mtlora.root": lambda: str(project_root()),
        "mtlora.data_dir": lambda: str(default_data_dir()),  # paths.data_dir: the one data-dir rule
        "mtlora.pid": lambda: str(os.getpid()),
        "mtlora.rank_subdir": _rank_subdir,
        "mtlora.staged_subdir": _staged_subdir,
        "mtlora.staged_log": _staged_log,
        "mtlora.rank_suffix": _rank_suffix,
        "mtlora.num_tasks": _num_tasks,
    }
    for name, fn in table.items():
        if not OmegaConf.has_resolver(name):
            # the pid names the sweep dir: computed once, so joblib/submitit workers reuse the parent's value
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "mtlora.pid")
