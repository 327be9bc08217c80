"""Worker entry started by ``accelerate launch``: ``python -m mtlora.launcher.worker <run_dir>``.

Reads the config the Hydra process saved in ``<run_dir>`` and runs its procedure (:mod:`mtlora.procedures`);
markers stay with the parent.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mtlora.procedures import procedure_for
from mtlora.run.rundir import load_resolved_config
from mtlora.utils.dist import exit_on_sigterm
from mtlora.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m mtlora.launcher.worker <run_dir>")
    exit_on_sigterm()
    run_dir = Path(argv[0])
    cfg = load_resolved_config(run_dir)
    setup_logging(run_dir)
    procedure_for(cfg).run(cfg, run_dir)


if __name__ == "__main__":
    main()
