"""Experiment trackers on Accelerate's tracking API (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``), started on the main process only.

``logger=`` picks the tracker (``conf/logger/*.yaml``):

* ``none`` / ``csv``: no tracker (the run dir's ``metrics/*.jsonl``, and ``train.csv`` for ``csv``, are written
  anyway);
* ``wandb`` / ``wandb_offline``: one wandb run per job (``logger.wandb``: project, entity, group, job type, tags,
  mode). Its id is stored in ``<run_dir>/wandb_id.txt`` and passed back on resume (``resume="allow"``), so a
  resumed job continues the same run; offline files go under ``<run_dir>/wandb/``;
* ``tensorboard``: event files under ``<run_dir>/tensorboard/`` (``pip install tensorboard``);
* ``mlflow``: one MLflow run in experiment ``logger.mlflow.experiment_name`` at ``logger.mlflow.tracking_uri``
  (``pip install mlflow``); its run id is stored in ``<run_dir>/mlflow_run_id.txt`` and continued on resume.

Values are logged flat: nested dicts become ``/``-joined keys (``train/task_loss/<task>``,
``eval/heldin/<task>/<metric>``), ``None`` is dropped. ``summary`` sets wandb's run summary; the other trackers
log the values at the last logged step. A job that fails marks its wandb run (exit code 1) or MLflow run
(``FAILED``) as failed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

#: ``logger.name`` -> Accelerate tracker name
TRACKERS = {"wandb": "wandb", "wandb_offline": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
#: tracker -> (importable module, what to install)
PACKAGES = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard (or pip install 'mtlora[tensorboard]')"),
    "mlflow": ("mlflow", "mlflow (or pip install 'mtlora[mlflow]')"),
}
WANDB_ID_FILE = "wandb_id.txt"
MLFLOW_ID_FILE = "mlflow_run_id.txt"


def tracker_name(logger_cfg: DictConfig | dict | None) -> str | None:
    """The Accelerate tracker of ``logger=`` (None for ``none`` / ``csv``); a ConfigError when its package is
    not installed."""
    name = str((logger_cfg or {}).get("name", "none"))
    kind = TRACKERS.get(name)
    if kind is None:
        return None
    module, install = PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"logger={name} needs the {module} package, which is not installed: pip install {install}, "
            "or choose logger=csv"
        )
    return kind


def accelerator_tracking_kwargs(logger_cfg: DictConfig | dict | None, run_dir: Path | None) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for ``logger=`` (``log_with``, and the logging dir TensorBoard needs)."""
    kind = tracker_name(logger_cfg)
    if kind is None:
        return {}
    out: dict[str, Any] = {"log_with": [kind]}
    if run_dir is not None:
        from accelerate.utils import ProjectConfiguration

        out["project_config"] = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    return out


def flat_values(values: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numbers of ``values`` with nested dicts joined by ``/`` (``None`` and non-numbers dropped)."""
    out: dict[str, float | int] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_values(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, int | float):
            out[key] = v
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as ``.``-joined keys with scalar values (lists as their string), for TensorBoard / MLflow."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = v if v is None or isinstance(v, bool | int | float | str) else str(v)
    return out


def heldin_values(result: dict) -> dict[str, float]:
    """Tracker values of a ``heldin`` evaluation: ``eval/heldin/<task>/<metric>`` and ``eval/heldin/macro/...``."""
    per = {t: {k: v for k, v in m.items() if k != "n"} for t, m in result["tasks"].items()}
    return flat_values({"eval/heldin": {**per, "macro": result["macro"]}})


class Tracker:
    """The trackers of one job. ``log`` / ``summary`` / ``finish`` do nothing where no tracker was started
    (``logger=none|csv``, or not the main process)."""

    def __init__(self, acc=None, owns_accelerator: bool = False) -> None:
        self.acc = acc
        self._owns = owns_accelerator
        self._step: int | None = None

    @property
    def active(self) -> bool:
        return self.acc is not None and bool(self.acc.trackers)

    def _get(self, name: str):
        return next((t for t in self.acc.trackers if t.name == name), None) if self.active else None

    @property
    def wandb_run(self):
        t = self._get("wandb")
        return None if t is None else t.tracker

    def log(self, metrics: dict[str, Any], step: int | None) -> None:
        if self.active:
            self.acc.log(flat_values(metrics), step=step)
            self._step = step if step is not None else self._step

    def summary(self, values: dict[str, Any]) -> None:
        if not self.active:
            return
        flat = flat_values(values)
        run = self.wandb_run
        if run is not None:
            run.summary.update(flat)
        others = [t for t in self.acc.trackers if t.name != "wandb"]
        for t in others:
            t.log(flat, step=self._step)

    def finish(self, ok: bool) -> None:
        """Mark a failed job's run as failed; the trackers are closed by ``accelerator.end_training`` (called
        here when the tracker owns its accelerator, else by the training loop after its last collective)."""
        if not self.active:
            return
        if not ok:
            for t in list(self.acc.trackers):
                if t.name == "wandb":
                    t.tracker.finish(exit_code=1)
                elif t.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="FAILED")
                else:
                    continue
                self.acc.trackers.remove(t)
        if self._owns:
            self.acc.end_training()
            self.acc = None


def _init_kwargs(kind: str, cfg: DictConfig, run_dir: Path) -> tuple[str, dict, bool]:
    """``(project name, init_kwargs, fresh)`` for the training job ``cfg`` (fresh: no earlier tracker run)."""
    lg = cfg.logger
    if kind == "wandb":
        w = lg.wandb
        id_file = run_dir / WANDB_ID_FILE
        fresh = not id_file.exists()
        run_id = uuid.uuid4().hex[:12] if fresh else id_file.read_text().strip()
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_START_METHOD", "thread")
        kw = {
            "entity": w.get("entity"),
            "group": w.get("group"),
            "job_type": w.get("job_type", "train"),
            "name": str(cfg.run_name),
            "tags": list(w.get("tags") or []),
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "mode": w.mode,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        return str(w.project), {"wandb": kw}, fresh
    if kind == "mlflow":
        m = lg.mlflow
        import mlflow

        uri = str(m.tracking_uri)
        if uri.startswith("sqlite:///"):  # the database file's folder must exist
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        id_file = run_dir / MLFLOW_ID_FILE
        fresh = not id_file.exists()
        kw = {"run_name": str(cfg.run_name), "tags": {str(t): "" for t in (m.get("tags") or [])} or None}
        if not fresh:
            kw["run_id"] = id_file.read_text().strip()
        return str(m.experiment_name), {"mlflow": kw}, fresh
    # tensorboard: event files in <logging_dir>/<project name> = <run_dir>/tensorboard
    return "tensorboard", {}, not (run_dir / "tensorboard").exists()


def start_tracker(cfg: DictConfig, run_dir: Path, acc=None, enabled: bool = True) -> Tracker:
    """Start the tracker of ``logger=`` for the training job ``cfg`` (one run per job; see the module doc).

    ``acc``: the job's Accelerator, made with :func:`accelerator_tracking_kwargs`; None: one is made here
    for the trackers alone (jobs that train without Accelerate, e.g. LoraHub's composition). ``enabled``:
    False on the processes other than the main one."""
    kind = tracker_name(cfg.logger)
    if kind is None or not enabled:
        return Tracker()
    owns = acc is None
    if owns:
        acc = tracker_accelerator(cfg.logger, run_dir)
    project, init_kwargs, fresh = _init_kwargs(kind, cfg, run_dir)
    acc.init_trackers(project, config=None, init_kwargs=init_kwargs)
    tracker = Tracker(acc, owns)
    if kind == "mlflow":
        (run_dir / MLFLOW_ID_FILE).write_text(acc.get_tracker("mlflow", unwrap=True).info.run_id)
    if kind != "wandb" and fresh:  # wandb got the nested config in init_kwargs; resumed runs keep theirs
        params = flat_params(OmegaConf.to_container(cfg, resolve=True))
        for t in acc.trackers:
            t.store_init_configuration(params)
    return tracker


def tracker_accelerator(logger_cfg: DictConfig | dict, run_dir: Path | None):
    """An ``Accelerator`` that only carries trackers (for jobs that do not train through Accelerate)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mtlora.utils.dist import launched_as_worker

    if not launched_as_worker():  # a single-process job owns the process (see procedures.finetune)
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, **accelerator_tracking_kwargs(logger_cfg, run_dir))
