"""``python -m mtlora.train [overrides]``: compose the config once, set up the run dir, train.

* single process (``hardware.launcher=none``): trains in this process;
* ``hardware.launcher=accelerate``: saves the resolved config and starts ``accelerate launch`` workers
  (:mod:`mtlora.launch`) that read it;
* direct ``accelerate launch -m mtlora.train hydra.run.dir=DIR ...``: every rank runs this entry; an
  explicit ``hydra.run.dir`` is required so that all ranks agree on the run dir, and rank 0 alone writes
  markers, config and meta.

Returns the final held-out macro exact match (for Hydra sweepers that optimise a metric).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtlora.adapters.inject import check_targets
from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.launch import spawn_workers
from mtlora.models.loading import meta_model
from mtlora.run.meta import config_hash, record_resume, write_meta
from mtlora.run.rundir import RESOLVED_CONFIG, claim, finish, save_resolved_config
from mtlora.utils.dist import env_rank, exit_on_sigterm, launched_as_worker
from mtlora.utils.resolvers import register_resolvers

register_resolvers()
log = logging.getLogger("mtlora.train")


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no weights: values, and target modules against the meta-device model."""
    validate_config(cfg)
    if cfg.model.get("arch") is not None:
        check_targets(meta_model(cfg.model), cfg.adapter)
    if "mmlu" in cfg.eval.get("suites", []) and cfg.eval.get("at_end", True):  # data before training
        from mtlora.eval.mmlu import mmlu_dir

        mmlu_dir(cfg.eval.mmlu.get("data_dir"))
    if cfg.adapter.get("method") == "lorahub":  # composition, not training: check the library up front
        from mtlora.lorahub import preflight_lorahub

        preflight_lorahub(cfg)


def _result(run_dir: Path) -> float | None:
    path = run_dir / "metrics" / "eval_heldin.json"
    return json.loads(path.read_text())["macro"]["exact_match"] if path.exists() else None


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


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Claim the run dir (``RUNNING``), then write the resolved config and ``meta.json`` (with the resume
    history when resuming). Called once per job, by the Hydra process or by rank 0."""
    claim(run_dir, cfg.get("resume"))
    warn_if_config_changed(cfg, run_dir)
    if cfg.get("resume") is not None:
        record_resume(run_dir, cfg)
    save_resolved_config(cfg, run_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    write_meta(run_dir, cfg, overrides=overrides)


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Train ``cfg`` into ``run_dir`` from a single (non-worker) process."""
    preflight(cfg)
    start_run(cfg, run_dir)
    try:
        if cfg.adapter.get("method") == "lorahub":  # gradient-free composition of trained LoRAs
            from mtlora.lorahub import compose_run

            compose_run(cfg, run_dir)
        elif cfg.hardware.launcher == "accelerate":
            code = spawn_workers(cfg, run_dir)
            if code != 0:
                raise RuntimeError(f"training workers exited with code {code}; see {run_dir}/train*.log")
        else:
            from mtlora.training.loop import run_training

            run_training(cfg, run_dir)
    except BaseException as e:
        finish(run_dir, ok=False, message=repr(e))
        raise
    finish(run_dir, ok=True)
    log.info("run dir: %s", run_dir)
    return _result(run_dir)


def run_direct_worker(cfg: DictConfig, run_dir: Path) -> float | None:
    """Entry for each rank of ``accelerate launch -m mtlora.train hydra.run.dir=DIR``."""
    if not any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        raise ConfigError(
            "`accelerate launch -m mtlora.train` needs an explicit hydra.run.dir=DIR so that all ranks "
            "use one run dir (or run `python -m mtlora.train hardware=...` and let it launch the workers)"
        )
    preflight(cfg)
    rank0 = env_rank() == 0
    from mtlora.training.loop import run_training

    if rank0:
        start_run(cfg, run_dir)
    try:
        run_training(cfg, run_dir)
    except BaseException as e:
        if rank0:
            finish(run_dir, ok=False, message=repr(e))
        raise
    if rank0:
        finish(run_dir, ok=True)
    return _result(run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    exit_on_sigterm()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if launched_as_worker():
        return run_direct_worker(cfg, run_dir)
    return run(cfg, run_dir)


if __name__ == "__main__":
    main()
