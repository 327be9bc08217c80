"""Where the project finds its inputs outside Hydra (the same rule as ``conf/paths/default.yaml``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: the repository root (the directory holding ``conf/`` and ``mtlora/``) when running from a checkout
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the environment variable that points at the shared data folder (``paths.data_dir``)
DATA_ENV = "MTLORA_DATA_DIR"
#: the configs shipped inside an installed package (``pip install .``: ``conf/`` becomes ``mtlora/conf``)
CONF_PACKAGE = "mtlora.conf"


def is_checkout() -> bool:
    """Whether the imported ``mtlora`` sits in a source checkout (``pyproject.toml`` and ``conf/`` beside it;
    editable installs included), as opposed to a plain install into site-packages."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "conf" / "train.yaml").is_file()


def project_root() -> Path:
    """``paths.root_dir``: the checkout's root, or the current directory for a plain install (so that
    ``outputs/`` lands where the command runs, not inside site-packages)."""
    return REPO_ROOT if is_checkout() else Path.cwd()


def _config_location() -> tuple[Path, str]:
    """(the config dir, the ``config_path`` given to ``hydra.main``): a checkout's own ``conf/`` (so that a
    checkout never reads the configs of another one through an editable install), else the installed
    package ``mtlora.conf`` as Hydra's ``pkg://`` search path."""
    if is_checkout():
        return REPO_ROOT / "conf", str(REPO_ROOT / "conf")
    spec = importlib.util.find_spec(CONF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))), f"pkg://{CONF_PACKAGE}"
    return REPO_ROOT / "conf", str(REPO_ROOT / "conf")  # neither: Hydra names the missing train.yaml


#: the directory holding ``train.yaml`` and the config groups
CONF_DIR, CONFIG_PATH = _config_location()


def default_data_dir() -> Path:
    """The shared data folder: ``$MTLORA_DATA_DIR`` when set (and not empty), else the ``shared/data``
    folder beside the repository (``<repo>/../shared/data``; for a plain install, beside the current
    directory), exactly as ``paths.data_dir`` resolves.

    The folder is not checked here: readers raise a :class:`mtlora.errors.DataError` naming the missing
    file and ``MTLORA_DATA_DIR`` when something they need is absent."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else project_root().parent / "shared" / "data"
