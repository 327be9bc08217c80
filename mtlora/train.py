"""``python -m mtlora.train [overrides]``: compose the config once, set up the run dir, train.

* single process (``hardware.launcher=none``): trains in this process;
* ``hardware.launcher=accelerate``: saves the resolved config and starts ``accelerate launch`` workers
  (:mod:`mtlora.launcher.launch`) that read it;
* direct ``accelerate launch -m mtlora.train hydra.run.dir=DIR ...``: every rank runs this entry; an
  explicit ``hydra.run.dir`` is required so that all ranks agree on the run dir, and rank 0 alone writes
  markers, config and meta.

Returns the metric named by ``optimized_metric`` (default: the final held-out macro exact match), for Hydra
sweepers that optimise a metric. In a multirun, a job that raises is marked ``FAILED`` and returns a failure
value (-inf/+inf when the sweeper maximises/minimises, else NaN) so that the sweep goes on; single runs
stop: a user error (``ConfigError``, ``DataError``, a hub model not cached offline, ...) with one line and
exit status 2 (:mod:`mtlora.cli.entry`), anything else with its traceback. A job requeued by SLURM
(``SLURM_RESTART_COUNT`` > 0) with ``resume=null`` resumes as with ``resume=auto``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from mtlora.cli.entry import user_errors
from mtlora.cli.errors import describe
from mtlora.cli.help import exit_with_help
from mtlora.errors import ConfigError
from mtlora.procedures import procedure_for
from mtlora.run.layout import RunLayout
from mtlora.run.manifest import config_hash, record_resume, write_meta
from mtlora.run.rundir import (
    MARKERS,
    RESOLVED_CONFIG,
    RunDirBusy,
    claim,
    claim_id,
    finish,
    is_run_dir,
    save_resolved_config,
    settle_staged_log,
)
from mtlora.utils.dist import env_rank, exit_on_sigterm, launched_as_worker, require_device
from mtlora.utils.paths import CONFIG_PATH
from mtlora.utils.resolvers import STAGED_SUFFIX, register_resolvers

# torch, transformers and the procedures' code are imported where they are used, so that `--help` and
# `--cfg job` answer without loading them.

register_resolvers()
log = logging.getLogger("mtlora.train")


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no weights: values, and target modules against the meta-device model."""
    from mtlora.adapters.inject import check_targets
    from mtlora.config import validate_config
    from mtlora.config.reference import hydra_reference
    from mtlora.config.validate import build_optimization
    from mtlora.models.factory import meta_model

    if cfg.adapter.get("method") == "none":  # a Base row (conf/experiment/<paper>/<table>/base.yaml)
        raise ConfigError(
            "adapter.method=none: the base model has nothing to train; evaluate it with "
            "`python -m mtlora.evaluate <the same overrides> out=DIR` (a run dir scripts/make_tables.py reads)"
        )
    validate_config(cfg, reference=hydra_reference())  # + unknown keys, non-boolean booleans
    build_optimization(cfg)  # the optimizer and scheduler build (e.g. no unknown keyword)
    if cfg.model.get("arch") is not None:
        check_targets(meta_model(cfg.model), cfg.adapter)
    if "mmlu" in cfg.eval.get("suites", []) and cfg.eval.get("at_end", True):  # data before training
        from mtlora.eval.mmlu import mmlu_dir

        mmlu_dir(cfg.eval.mmlu.get("data_dir"))
    procedure_for(cfg).check(cfg)  # the procedure's own checks (lorahub: its library, before any weights)


def spawn_workers(cfg: DictConfig, run_dir: Path) -> int:
    """:func:`mtlora.launcher.launch.spawn_workers`, imported on first use (it loads torch)."""
    from mtlora.launcher.launch import spawn_workers as spawn

    return spawn(cfg, run_dir)


def check_machine(cfg: DictConfig) -> None:
    """What this machine must have for ``cfg`` (the preset itself is checked by :func:`preflight`): the
    requested device, never a silent fallback to the CPU."""
    hw = cfg.hardware
    require_device(str(hw.get("device") or "cpu"), processes=int(hw.get("num_processes") or 1))


DEFAULT_METRIC = "heldin/exact_match"


def _result(run_dir: Path, metric: str | None = None) -> float | None:
    """The final value of ``metric`` = ``<suite>/<key>/...`` from ``metrics/eval_<suite>.json`` (or the one
    ``eval_<suite>_*.json``, e.g. ``bbh`` -> ``eval_bbh_<protocol>.json``). A key missing at the top level is
    looked up under ``macro`` (``heldin/exact_match`` = macro exact match); a dict at the end gives its
    ``accuracy`` / ``exact_match`` / ``score`` (``bbh/macro`` = macro accuracy). None when absent."""
    suite, *keys = (metric or DEFAULT_METRIC).split("/")
    layout = RunLayout(run_dir)
    mdir = layout.metrics
    files = [layout.suite(suite)] if layout.suite(suite).exists() else []
    files = files or sorted(mdir.glob(f"eval_{suite}_*.json"))
    if len(files) != 1:
        return None
    value = json.loads(files[0].read_text())
    for k in keys:
        if isinstance(value, dict) and k not in value and isinstance(value.get("macro"), dict):
            value = value["macro"]
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    if isinstance(value, dict):
        value = next((value[k] for k in ("accuracy", "exact_match", "score") if k in value), None)
    return float(value) if isinstance(value, (int, float)) else None


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(run_dir: Path, e: Exception) -> float:
    """Multirun: mark the job ``FAILED`` (also when it failed before the run started), log the error and
    return the failure value, so the sweep goes on (mtlora.run.callbacks lists the failures at the end)."""
    # a job that failed before claiming its run dir leaves a run found there (e.g. COMPLETED) alone
    if not isinstance(e, RunDirBusy) and not any((run_dir / m).exists() for m in MARKERS):
        run_dir.mkdir(parents=True, exist_ok=True)
        settle_hydra_output(run_dir)  # a fresh job dir: keep its .hydra/ (failed_jobs.txt reads it)
        finish(run_dir, ok=False, message=repr(e))
    message = describe(e)
    if message is None:
        log.exception("job failed (the sweep goes on): %s", run_dir)
    else:  # a user error: its one line (mtlora.cli.errors)
        log.error("job failed (the sweep goes on): %s: %s", run_dir, message)
    direction = str(HydraConfig.get().sweeper.get("direction", "")).lower()
    return (
        -math.inf
        if direction.endswith("maximize")
        else math.inf
        if direction.endswith("minimize")
        else math.nan
    )


def warn_if_config_changed(cfg: DictConfig, run_dir: Path) -> None:
    """On resume into an existing run dir, say when the config differs from the one it was started with,
    and keep that earlier config as ``config_resolved.before_resume[N].yaml``."""
    meta, resolved = run_dir / "meta.json", run_dir / RESOLVED_CONFIG
    if cfg.get("resume") is None or not meta.exists() or not resolved.exists():
        return
    old, new = json.loads(meta.read_text()).get("config_hash"), config_hash(cfg)
    if old and old != new:
        n = len(list(run_dir.glob("config_resolved.before_resume*.yaml")))
        before = run_dir / f"config_resolved.before_resume{n or ''}.yaml"
        shutil.copyfile(resolved, before)
        log.warning(
            "resuming %s with a config that differs from the one it started with (config hash %s, now %s); "
            "the earlier config is kept in %s",
            run_dir,
            old,
            new,
            before,
        )


def check_resume(cfg: DictConfig, run_dir: Path) -> bool:
    """Before anything in ``run_dir`` is touched: check that ``resume`` can continue the run there.

    Returns True when there is nothing to do: ``run_dir`` holds a ``COMPLETED`` run whose recorded config
    hash equals this config's. Raises :class:`ConfigError` when the checkpoint to resume from does not fit
    this config (:func:`mtlora.training.checkpoint.check_checkpoint_fits`), or when ``resume=auto`` would
    train a ``COMPLETED`` run without checkpoints again from step 0 (replacing its adapter)."""
    from mtlora.training.checkpoint import check_checkpoint_fits, resolve_resume

    resume = cfg.get("resume")
    if resume is None:
        return False
    completed = (run_dir / "COMPLETED").exists() and not (run_dir / "RUNNING").exists()
    meta = run_dir / "meta.json"
    if meta.exists():  # a damaged record is named here, before the run dir is claimed
        from mtlora.run.checksums import read_json

        if completed and read_json(meta).get("config_hash") == config_hash(cfg):
            return True
    ckpt = resolve_resume(resume, run_dir)
    if ckpt is not None:
        check_checkpoint_fits(cfg, ckpt)
    elif resume == "auto" and completed:
        raise ConfigError(
            f"resume=auto: {run_dir} holds a COMPLETED run with another config and no checkpoint to continue "
            "from; it would be trained again from step 0 and its adapter replaced: choose another "
            "hydra.run.dir (or keep its config to leave it as it is)"
        )
    return False


def settle_hydra_output(run_dir: Path) -> None:
    """Move this launch's staged Hydra output (``.hydra.pending-<pid>/``, conf/hydra/default.yaml) to
    ``.hydra/`` when the launch owns ``run_dir`` (it claimed it, or the dir holds no run), else remove it:
    a launch that is refused never replaces the ``.hydra/`` record of the run it found there."""
    if not HydraConfig.initialized():
        return
    owner = claim_id(run_dir) is not None or not is_run_dir(run_dir)
    settle_staged_log(owner)  # and the job log (train.log)
    sub = HydraConfig.get().output_subdir
    if not sub or STAGED_SUFFIX not in str(sub):
        return
    staged = run_dir / str(sub)
    if not staged.is_dir():
        return
    if not owner:
        shutil.rmtree(staged, ignore_errors=True)
        return
    final = run_dir / str(sub).split(STAGED_SUFFIX)[0]
    if final.exists():  # the record of the launch this one resumes
        old = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Claim the run dir (claim lock, ``RUNNING``), move this launch's ``.hydra/`` in, then write the
    resolved config and ``meta.json`` (with the resume history when resuming). Called once per job, by
    the Hydra process or by rank 0."""
    claim(run_dir, cfg.get("resume"))
    settle_hydra_output(run_dir)
    warn_if_config_changed(cfg, run_dir)
    if cfg.get("resume") is not None:
        record_resume(run_dir, cfg)
    save_resolved_config(cfg, run_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    write_meta(run_dir, cfg, overrides=overrides)


def run_secondary_machine(
    cfg: DictConfig, run_dir: Path, timeout_s: float = 600.0, poll_s: float = 2.0
) -> None:
    """Machine ``k > 0`` of a multi-node job (``hardware.machine_rank``): machine 0's Hydra process claims the
    shared run dir and writes its config and markers; this one waits for ``config_resolved.yaml`` and starts
    its own workers, which join machine 0's process group."""
    preflight(cfg)
    check_machine(cfg)
    deadline = time.monotonic() + timeout_s
    while not (run_dir / RESOLVED_CONFIG).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"machine_rank={cfg.hardware.machine_rank}: machine 0 did not write {run_dir / RESOLVED_CONFIG} "
                f"within {timeout_s:.0f} s (is hydra.run.dir the same shared directory on every machine?)"
            )
        time.sleep(poll_s)
    code = spawn_workers(cfg, run_dir)
    if code != 0:
        raise RuntimeError(f"training workers of machine {cfg.hardware.machine_rank} exited with code {code}")


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train ``cfg`` into ``run_dir`` from a single (non-worker) process."""
    if int(cfg.hardware.get("machine_rank") or 0) > 0:
        run_secondary_machine(cfg, run_dir)
        return None
    preflight(cfg)
    check_machine(cfg)
    if check_resume(cfg, run_dir):
        log.info("%s is already COMPLETED with this config; nothing to resume", run_dir)
        print(f"{run_dir} is already COMPLETED with this config; nothing to resume", flush=True)
        return _result(run_dir, cfg.get("optimized_metric"))
    procedure = procedure_for(cfg)  # finetune, or the procedure of cfg.adapter.method (lorahub)
    start_run(cfg, run_dir)
    try:
        if procedure.workers and cfg.hardware.launcher == "accelerate":
            code = spawn_workers(cfg, run_dir)
            if code != 0:
                raise RuntimeError(f"training workers exited with code {code}; see {run_dir}/train*.log")
        else:
            procedure.run(cfg, run_dir)
    except BaseException as e:
        finish(run_dir, ok=False, message=repr(e))
        raise
    finish(run_dir, ok=True)
    log.info("run dir: %s", run_dir)
    return _result(run_dir, cfg.get("optimized_metric"))


def run_direct_worker(cfg: DictConfig, run_dir: Path) -> float | None:
    """Entry for each rank of ``accelerate launch -m mtlora.train hydra.run.dir=DIR``."""
    if not any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        raise ConfigError(
            "`accelerate launch -m mtlora.train` needs an explicit hydra.run.dir=DIR so that all ranks "
            "use one run dir (or run `python -m mtlora.train hardware=...` and let it launch the workers)"
        )
    preflight(cfg)
    check_machine(cfg)
    rank0 = env_rank() == 0
    procedure = procedure_for(cfg)
    if check_resume(cfg, run_dir):  # every rank reads the same files and returns alike
        if rank0:
            log.info("%s is already COMPLETED with this config; nothing to resume", run_dir)
        return _result(run_dir, cfg.get("optimized_metric"))
    if rank0:
        start_run(cfg, run_dir)
    try:
        procedure.run(cfg, run_dir)
    except BaseException as e:
        if rank0:
            finish(run_dir, ok=False, message=repr(e))
        raise
    if rank0:
        finish(run_dir, ok=True)
    return _result(run_dir, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    exit_on_sigterm()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors(cfg):  # a user error: one line, exit status 2 (mtlora.cli.entry)
            if launched_as_worker():
                return run_direct_worker(cfg, run_dir)
            if cfg.get("resume") is None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
                log.warning("requeued SLURM job (SLURM_RESTART_COUNT>0): resuming as with resume=auto")
                with read_write(cfg), open_dict(cfg):
                    cfg.resume = "auto"
            if not _multirun():
                return run(cfg, run_dir)
            try:
                return run(cfg, run_dir)
            except (
                Exception
            ) as e:  # not SystemExit/KeyboardInterrupt: SIGTERM and Ctrl-C still stop the sweep
                return _job_failed(run_dir, e)
    finally:
        settle_hydra_output(run_dir)  # refused before the claim: drop the staged .hydra/


if __name__ == "__main__":
    exit_with_help("train", sys.argv[1:])  # the same text as Hydra's, without composing
    main()
