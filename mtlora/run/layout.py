"""The run-dir layout: the one place that names the files and folders of a run dir.

Training, LoraHub and ``mtlora.evaluate`` write into the same layout, and evaluate, export, diagnose, count,
the report and ``load_run`` read it back; each asks :class:`RunLayout` for a path instead of spelling it.
``docs/run_dir.md`` describes what each file holds.

::

    <run dir>/
      config_resolved.yaml  meta.json  RUNNING|COMPLETED|FAILED  train.log
      metrics/    train.jsonl  eval.jsonl  per_task.csv  eval_<suite>.{json,csv,md}  <procedure>.json
      predictions/<suite>/<task>.jsonl
      plots/      loss.png  diagnostics/
      adapter/    adapter_model.safetensors  adapter_config.json  checksums.json
      base_model/ source.json  tokenizer/  config.json
      checkpoints/step_<N>/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METRICS = "metrics"
PREDICTIONS = "predictions"
PLOTS = "plots"
ADAPTER = "adapter"
BASE_MODEL = "base_model"
CHECKPOINTS = "checkpoints"
#: where a later evaluation into the same dir moves the earlier outputs of its suites
EARLIER_EVALS = "earlier_evals"
#: the subdirectories only the run that owns the dir writes (evaluate and export refuse to write into them)
OWN_SUBDIRS = (ADAPTER, BASE_MODEL, CHECKPOINTS, ".hydra")


@dataclass(frozen=True)
class RunLayout:
    """Paths inside the run dir ``root`` (nothing is created until a writer asks for it)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---------------------------------------------------------------------------------------- folders
    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def base_model(self) -> Path:
        return self.root / BASE_MODEL

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def earlier_evals(self) -> Path:
        return self.root / EARLIER_EVALS

    # ------------------------------------------------------------------------------------------ files
    @property
    def resolved_config(self) -> Path:
        """``config_resolved.yaml``: the run's composed config, every interpolation resolved."""
        return self.root / "config_resolved.yaml"

    @property
    def meta(self) -> Path:
        """``meta.json``: environment, parameter counts, timings."""
        return self.root / "meta.json"

    def log(self, name: str) -> Path:
        """``metrics/<name>.jsonl``: an append-only series (``train``, ``eval``, ``diagnostics``)."""
        return self.metrics / f"{name}.jsonl"

    def suite(self, name: str, ext: str = "json") -> Path:
        """``metrics/eval_<name>.<ext>``: the final table of evaluation suite ``name``."""
        return self.metrics / f"eval_{name}.{ext}"

    def suite_predictions(self, name: str) -> Path:
        """``predictions/<name>/``: one ``<task>.jsonl`` of per-example predictions per task."""
        return self.predictions / name

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{int(step)}"

    @property
    def per_task_csv(self) -> Path:
        return self.metrics / "per_task.csv"

    @property
    def train_csv(self) -> Path:
        return self.metrics / "train.csv"

    @property
    def loss_plot(self) -> Path:
        return self.plots / "loss.png"

    @property
    def base_model_source(self) -> Path:
        return self.base_model / "source.json"

    @property
    def adapter_config(self) -> Path:
        return self.adapter / "adapter_config.json"
