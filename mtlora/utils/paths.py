"""Where the project finds its inputs outside Hydra (the same rule as ``conf/paths/default.yaml``)."""

from __future__ import annotations

import os
from pathlib import Path

#: the repository root (the directory holding ``conf/`` and ``mtlora/``)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the environment variable that points at the shared data folder (``paths.data_dir``)
DATA_ENV = "MTLORA_DATA_DIR"


def default_data_dir() -> Path:
    """The shared data folder: ``$MTLORA_DATA_DIR`` when set (and not empty), else the ``shared/data``
    folder beside the repository (``<repo>/../shared/data``), exactly as ``paths.data_dir`` resolves.

    The folder is not checked here: readers raise a :class:`mtlora.errors.DataError` naming the missing
    file and ``MTLORA_DATA_DIR`` when something they need is absent."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"
