"""One log format for every entry point, and rank-aware logging for the training workers.

:data:`LOG_FORMAT` is the format of Hydra's job logging (``conf/hydra/default.yaml``, used by
``python -m mtlora.train``); the entry points that run without Hydra's logging (``evaluate``, ``diagnose``,
``export``, the ``accelerate launch`` workers) use the same string. Workers: rank 0 logs at INFO to the
console and ``train.log``; other ranks log warnings only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mtlora.utils.dist import env_rank

#: keep equal to ``hydra.job_logging.formatters.simple.format`` in conf/hydra/default.yaml
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def console_logging(level: int = logging.INFO) -> None:
    """INFO (``level``) and above to stderr in :data:`LOG_FORMAT`, for entry points without Hydra's logging."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def setup_logging(run_dir: Path | None, rank: int | None = None) -> None:
    """Route the ``mtlora`` loggers to the console and to ``<run_dir>/train[.rankN].log``."""
    rank = env_rank() if rank is None else rank
    root = logging.getLogger("mtlora")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(console)
    if run_dir is not None:
        name = "train.log" if rank == 0 else f"train.rank{rank}.log"
        fh = logging.FileHandler(Path(run_dir) / name)
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(fh)
