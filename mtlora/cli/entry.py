"""What every command-line entry point does around its work: one-line user errors, exit status 2.

A user error (:func:`mtlora.cli.errors.describe`: the project's own exceptions, the Hugging Face Hub's
offline / not-found errors) ends the command with one line on stderr, ``error: <message>``, and exit
status :data:`EXIT_USER_ERROR`; the line also goes to the job's log file. ``HYDRA_FULL_ERROR=1`` (Hydra's
own switch) re-raises it with its traceback. Any other exception keeps its traceback. Inside a Hydra
multirun the exception propagates, so the job fails and the sweep goes on (``mtlora.train`` marks the job
``FAILED``).

Hydra entry points wrap their task function's body in :func:`user_errors`, which first refuses a
top-level ``local:`` key (:func:`check_local_overrides`); plain ones call :func:`run_main`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mtlora.cli.errors import describe, hub_error_kind
from mtlora.errors import ConfigError

#: exit status of a command stopped by a user error (as argparse's usage errors)
EXIT_USER_ERROR = 2
log = logging.getLogger("mtlora")


#: applied by the commands that only read (count, evaluate, diagnose) unless given on the command line: they
#: write no Hydra output (Hydra would otherwise create the run dir of conf/hydra/default.yaml with `.hydra/`
#: and a log file in it)
NO_OUTPUT_OVERRIDES = {
    "hydra.run.dir": ".",
    "hydra.output_subdir": "null",
    "hydra/job_logging": "none",
    "hydra/hydra_logging": "none",
}


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: show the traceback (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report(message: str) -> None:
    """``error: <message>`` on stderr, and into the log files of the logging setup (a Hydra job's
    ``<job>.log``) without repeating it on the console."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _hydra_choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _local_file(name: str) -> str:
    """Where Hydra found ``local/<name>.yaml``: the first config source holding it (``--config-dir`` and
    ``hydra.searchpath`` included), else ``conf/local/<name>.yaml``."""
    from hydra.core.hydra_config import HydraConfig

    from mtlora.utils.paths import CONF_DIR, CONFIG_PATH

    rel = f"local/{name}.yaml"
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.schema == "file":
                base: Path | None = Path(source.path)
            elif source.schema == "pkg" and f"pkg://{source.path}" == CONFIG_PATH:
                base = CONF_DIR
            else:
                base = None
            if base is not None and (base / rel).is_file():
                return str(base / rel)
    return f"conf/{rel}"


def check_local_overrides(cfg: Any) -> None:
    """Refuse a top-level ``local:`` key: a ``conf/local/<name>.yaml`` without ``# @package _global_`` as
    its first line puts its keys there, where nothing reads them."""
    if "local" not in cfg:
        return
    path = _local_file(_hydra_choice("local") or "default")
    raise ConfigError(
        f"{path} lacks the `# @package _global_` header, so its keys landed under a top-level `local:` key "
        "that nothing reads; make that header its first line (as in conf/local/example.yaml)"
    )


def run_model(run_dir: str | Path | None) -> Any:
    """The ``model`` node of a run dir's ``config_resolved.yaml`` (None when there is none)."""
    if not run_dir:
        return None
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config_resolved.yaml"
    return OmegaConf.load(path).get("model") if path.is_file() else None


def _model(model: Callable[[], Any] | None, e: BaseException) -> Any:
    if model is None or hub_error_kind(e) is None:
        return None
    try:
        return model()
    except Exception:  # the model config only improves the message; never a second failure
        return None


@contextmanager
def user_errors(cfg: Any = None, model: Callable[[], Any] | None = None) -> Iterator[None]:
    """Around the body of a Hydra task function (module doc). ``cfg``: the composed config (its ``local:``
    key is refused; ``cfg.model`` names the model in hub errors unless ``model`` returns another node)."""
    if model is None and cfg is not None:
        model = lambda: cfg.get("model")  # noqa: E731
    try:
        if cfg is not None:
            check_local_overrides(cfg)
        yield
    except Exception as e:
        if full_error() or _multirun():
            raise
        message = describe(e, _model(model, e))
        if message is None:
            raise
        report(message)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_main(main: Callable[[], int | None], model: Callable[[], Any] | None = None) -> int:
    """Call a plain (non-Hydra) ``main()``: its return code, or :data:`EXIT_USER_ERROR` after the one line
    of a user error (module doc)."""
    try:
        return int(main() or 0)
    except Exception as e:
        if full_error():
            raise
        message = describe(e, _model(model, e))
        if message is None:
            raise
        report(message)
        return EXIT_USER_ERROR


def exit_if_help(argv: list[str], text: str | None) -> None:
    """Print ``text`` and exit 0 when ``argv`` asks for help (``-h``, ``--help``, ``help``): called by a
    plain entry module before its heavy imports, so that help is instant."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(text or "")
        raise SystemExit(0)


def with_default_overrides(argv: list[str], defaults: dict[str, str]) -> list[str]:
    """``argv`` plus ``key=value`` for each of ``defaults`` whose key it does not set, placed where Hydra's
    parser takes them: beside the user's overrides (they must form one run, options such as
    ``--config-dir DIR`` or ``-p KEY`` before or after it); without overrides, last, or first when the
    arguments end with a flag (``--info`` would take the next argument as its value)."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv[1:] if "=" in a}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    first = next((i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")), None)
    if first is not None:
        return [*argv[:first], *extra, *argv[first:]]
    if len(argv) > 1 and argv[-1].startswith("-"):
        return [argv[0], *extra, *argv[1:]]
    return [*argv, *extra]


def argv_value(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=value`` in ``argv`` (``+key=`` too)."""
    found = None
    for a in argv:
        k, sep, v = a.partition("=")
        if sep and k.lstrip("+") == key:
            found = v
    return found
