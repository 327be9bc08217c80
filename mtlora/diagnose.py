"""``python -m mtlora.diagnose run_dir=R [diagnostics=full] [diagnostics.which=[conflict]]``: diagnostics of a saved run.

Loads the finished run with :func:`mtlora.trained_run.load_run` and rebuilds its data from the run's own
``config_resolved.yaml`` (same tasks, splits and seed), then runs the diagnostics of the ``diagnostics``
config group (``default`` unless given; every one of its ``which``, the schedule keys are ignored) on the
run's training rows (gradient conflict, routing) and held-out rows (divergence, t-SNE of representations).
The head-similarity increments (``B − B₀``) use the initial heads the training loop saved in the run dir
(``init_heads.safetensors``); a run without that file reports them as null.
Writes into the run dir: records with ``"source": "diagnose"`` appended to ``metrics/diagnostics.jsonl``
and plots under ``plots/diagnostics/`` (``*_diagnose_step<N>.png``). Nothing else is written: no Hydra
output dir, no ``.hydra/``, no log file (as :mod:`mtlora.count`) -- except the tracker's files below.

Tracker: when the run logged to wandb (``logger=wandb|wandb_offline``), the scalars (``diag/<name>/<stat>``
at the run's last step) go to a **new** wandb run (``job_type: diagnose``, name ``<run_name>-diagnose``) in
the run's project, entity and group, with the same mode (files under ``<run_dir>/wandb/``; its config holds
the diagnosed run dir and wandb id). A new run, not the training run resumed: wandb drops values logged at
a step the run has already passed. ``logger=`` on the command line overrides the choice: ``logger=none``
logs nothing, ``logger=wandb_offline`` logs offline (also for a run trained without wandb, then into
project ``logger.wandb.project`` and the run's ``task_name`` as group).

Usage::

    python -m mtlora.diagnose run_dir=outputs/train/runs/<run_name>/<date_time>_local_<pid>
    python -m mtlora.diagnose run_dir=R diagnostics=full                  # t-SNE plots too
    python -m mtlora.diagnose run_dir=R 'diagnostics.which=[conflict]' diagnostics.conflict.batches_per_task=8
    python -m mtlora.diagnose run_dir=R device=cuda allow_incomplete=true
    python -m mtlora.diagnose run_dir=R logger=wandb_offline              # scalars to an offline wandb run
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtlora.cli.entry import NO_OUTPUT_OVERRIDES, run_model, user_errors, with_default_overrides
from mtlora.cli.help import exit_with_help
from mtlora.errors import ConfigError
from mtlora.run.checksums import read_json
from mtlora.run.layout import RunLayout
from mtlora.run.metrics import read_jsonl
from mtlora.run.tracker import WANDB_ID_FILE, Tracker, tracker_accelerator, tracker_name
from mtlora.utils.logging import console_logging
from mtlora.utils.paths import CONFIG_PATH
from mtlora.utils.resolvers import register_resolvers

register_resolvers()
log = logging.getLogger("mtlora.diagnose")

#: command-line keys that are not part of the train config (passed with a ``+``)
EXTRA_KEYS = ("run_dir", "device", "allow_incomplete", "trust_remote_code")


def final_step(run_dir: Path) -> int:
    """The run's last optimizer step: the last ``metrics/train.jsonl`` record, else ``meta.json``, else 0."""
    train = RunLayout(run_dir).log("train")
    if train.exists():
        records = read_jsonl(train)
        if records:
            return int(records[-1]["step"])
    meta = RunLayout(run_dir).meta
    if meta.exists():
        return int(read_json(meta).get("total_steps") or 0)
    return 0


def _is_wandb(logger: DictConfig | None) -> bool:
    return logger is not None and str(logger.get("name", "none")).startswith("wandb")


def diagnose_tracker(saved: DictConfig, run_dir: Path, logger: DictConfig, diag_cfg: DictConfig) -> Tracker:
    """A :class:`~mtlora.run.tracker.Tracker` on a new wandb run (Accelerate's wandb tracker) for the records of
    one ``diagnose`` call (see the module doc); the id file (``wandb_id.txt``, the training run's) is left alone."""
    tracker_name(logger)  # ConfigError when wandb is not installed
    trained = saved.get("logger")
    w = (trained if _is_wandb(trained) else logger).wandb
    id_file = run_dir / WANDB_ID_FILE
    os.environ.setdefault("WANDB_START_METHOD", "thread")
    config = OmegaConf.to_container(saved, resolve=True)
    config["diagnose"] = {
        "run_dir": str(run_dir),
        "wandb_id": id_file.read_text().strip() if id_file.exists() else None,
        "diagnostics": OmegaConf.to_container(diag_cfg, resolve=True),
    }
    kwargs = {
        "entity": w.get("entity"),
        "group": w.get("group") if _is_wandb(trained) else str(saved.get("task_name", "train")),
        "job_type": "diagnose",
        "name": f"{saved.get('run_name', run_dir.name)}-diagnose",
        "tags": list(w.get("tags") or []) if _is_wandb(trained) else list(saved.get("tags") or []),
        "dir": str(run_dir),
        "id": uuid.uuid4().hex[:12],
        "mode": logger.wandb.mode,
        "config": config,
    }
    acc = tracker_accelerator(logger, run_dir)
    acc.init_trackers(str(w.project), config=None, init_kwargs={"wandb": kwargs})
    return Tracker(acc, owns_accelerator=True)


def diagnose(
    run_dir: str | Path,
    diag_cfg: DictConfig,
    device: str = "cpu",
    allow_incomplete: bool = False,
    logger: DictConfig | None = None,
    trust_remote_code: bool = False,
) -> list[dict]:
    """Run every diagnostic of ``diag_cfg.which`` on the saved run ``run_dir``; returns the records written.

    ``logger``: a ``logger`` config node that decides the tracker (None: the run's own ``logger``);
    ``trust_remote_code``: see :func:`mtlora.trained_run.guard_remote_code` (off unless given)."""
    import datasets

    from mtlora.data import build_data
    from mtlora.diagnostics import DiagnosticsRunner
    from mtlora.run.rundir import load_resolved_config
    from mtlora.trained_run import guard_remote_code, load_run
    from mtlora.utils.dist import require_device

    datasets.disable_progress_bars()
    require_device(device, key="device")
    run_dir = Path(run_dir)
    model, tokenizer = load_run(
        run_dir, device=device, allow_incomplete=allow_incomplete, trust_remote_code=trust_remote_code
    )
    saved = guard_remote_code(load_resolved_config(run_dir), run_dir, trust_remote_code)
    data = build_data(saved.data, tokenizer, int(saved.model.max_seq_len))
    runner = DiagnosticsRunner(
        diag_cfg,
        model,
        data,
        run_dir,
        tracker=None,
        seed=int(saved.get("seed", 0)),
        source="diagnose",
        method=str(saved.adapter.get("method")),
    )
    logger = saved.get("logger") if logger is None else logger
    tracker = diagnose_tracker(saved, run_dir, logger, diag_cfg) if _is_wandb(logger) else None
    runner.tracker = tracker
    ok = False
    try:
        records = runner.run(final_step(run_dir), "diagnose")
        ok = True
    finally:
        if tracker is not None:
            tracker.finish(ok)
    return records


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    console_logging()
    run_dir = cfg.get("run_dir")
    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    with user_errors(cfg, model=lambda: run_model(run_dir)):
        from mtlora.config.command_line import check_command_line

        why = "the run's config_resolved.yaml gives it"
        uses = ("diagnostics", "logger", "paths")
        check_command_line(cfg, "mtlora.diagnose", uses, ("diagnostics.",), own_keys=EXTRA_KEYS, why=why)
        if not run_dir:
            raise ConfigError(
                "run_dir= is required: python -m mtlora.diagnose run_dir=<run dir> [diagnostics=full]"
            )
        records = diagnose(
            run_dir,
            cfg.diagnostics,
            str(cfg.get("device") or "cpu"),
            _flag(cfg, "allow_incomplete"),
            logger=cfg.logger if "logger" in given else None,  # else the run's own logger
            trust_remote_code=_flag(cfg, "trust_remote_code"),
        )
    done = sorted({r["diagnostic"] for r in records})
    print(
        f"diagnostics {done} of {run_dir} -> {Path(run_dir) / 'metrics' / 'diagnostics.jsonl'}, "
        f"plots in {Path(run_dir) / 'plots' / 'diagnostics'}",
        flush=True,
    )
    print(OmegaConf.to_yaml(OmegaConf.create({r["diagnostic"]: _scalars(r) for r in records})), flush=True)


def _flag(cfg: DictConfig, key: str) -> bool:
    """A command-line boolean: true/false only (a typo must not switch anything on or off)."""
    v = cfg.get(key)
    if v is None or isinstance(v, bool):
        return bool(v)
    raise ConfigError(f"{key}={v!r}: allowed values are true or false")


def _scalars(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if isinstance(v, int | float) and k not in ("step", "seconds")}


def with_defaults(argv: list[str]) -> list[str]:
    """``argv`` with ``run_dir=``/``device=``/``allow_incomplete=`` as ``+`` additions, ``diagnostics=default``
    unless a ``diagnostics=`` choice is given, and :data:`mtlora.cli.entry.NO_OUTPUT_OVERRIDES` for the keys it
    does not set itself."""
    args = [f"+{a}" if a.split("=", 1)[0] in EXTRA_KEYS else a for a in argv[1:]]
    defaults = {**NO_OUTPUT_OVERRIDES, "hydra/help": "diagnose", "diagnostics": "default"}
    return with_default_overrides([argv[0], *args], defaults)


if __name__ == "__main__":
    exit_with_help("diagnose", sys.argv[1:])  # the same text as Hydra's, without composing
    sys.argv = with_defaults(sys.argv)
    main()
