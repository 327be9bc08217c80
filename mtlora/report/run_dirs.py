"""Read finished run dirs for the report: each run's config, status marker and trainable-parameter share
(:func:`collect_runs`), and one evaluation metric (``METRICS``) from its ``metrics/eval_<suite>.json``
(:func:`metric_value`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlora.run.layout import RunLayout
from mtlora.run.rundir import MARKERS


@dataclass(frozen=True)
class Metric:
    """``metrics/eval_<suite>.json`` (``bbh``: ``eval_bbh_<protocol>.json``): ``aggregate`` path for the
    headline, ``per_task`` key inside ``tasks.<task>``."""

    suite: str
    aggregate: tuple[str, str]
    per_task: str
    label: str


METRICS: dict[str, Metric] = {
    "bbh_macro": Metric("bbh", ("macro", "accuracy"), "accuracy", "BBH accuracy, mean over tasks"),
    "bbh_micro": Metric("bbh", ("micro", "accuracy"), "accuracy", "BBH accuracy, pooled over examples"),
    "heldin_exact_match": Metric(
        "heldin", ("macro", "exact_match"), "exact_match", "held-in exact match (teacher-forced), task mean"
    ),
    "heldin_token_acc": Metric(
        "heldin", ("macro", "token_acc"), "token_acc", "held-in token accuracy, task mean"
    ),
    "heldin_gen_accuracy": Metric(
        "heldin_gen", ("macro", "accuracy"), "accuracy", "held-in generation accuracy, task mean"
    ),
    "heldin_gen_score": Metric(
        "heldin_gen", ("macro", "score"), "score", "held-in generation score, task mean"
    ),
    "mmlu_micro": Metric("mmlu", ("micro", "accuracy"), "accuracy", "MMLU accuracy, pooled over questions"),
    "mmlu_macro": Metric("mmlu", ("macro", "accuracy"), "accuracy", "MMLU accuracy, mean over subjects"),
}


def select(cfg: dict, path: str, default: Any = None) -> Any:
    """``cfg["a"]["b"]`` for ``path="a.b"`` (``default`` where missing)."""
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


@dataclass
class Run:
    path: Path
    status: str  # completed | failed | running | unknown
    cfg: dict
    message: str = ""
    finished: float = 0.0  # marker mtime (the newest run wins when a (cell, column, seed) repeats)
    params_pct: float | None = None

    @property
    def paper(self) -> str | None:
        return select(self.cfg, "report.paper")

    @property
    def table(self) -> str | None:
        return select(self.cfg, "report.table")

    @property
    def cell(self) -> str:
        return select(self.cfg, "report.cell") or select(self.cfg, "adapter.name") or "?"

    @property
    def model(self) -> str:
        return str(select(self.cfg, "model.name", "?"))

    @property
    def seed(self) -> Any:
        return select(self.cfg, "seed")


def _read_run(path: Path) -> Run:
    layout = RunLayout(path)
    cfg = yaml.safe_load(layout.resolved_config.read_text()) or {}
    status, message, finished = "unknown", "", 0.0
    # a final marker wins over RUNNING (``finish`` writes COMPLETED/FAILED, then removes RUNNING)
    for marker in sorted(MARKERS, key=lambda m: m == "RUNNING"):
        m = path / marker
        if m.exists():
            status = marker.lower()
            finished = m.stat().st_mtime
            if marker == "FAILED":
                lines = [x.strip() for x in m.read_text().splitlines()[1:] if x.strip()]
                message = lines[-1] if lines else ""
            break
    params = None
    meta = layout.meta
    if meta.exists():
        try:
            params = json.loads(meta.read_text()).get("parameters", {}).get("trainable_pct")
        except (json.JSONDecodeError, AttributeError):
            params = None
    return Run(path=path, status=status, cfg=cfg, message=message, finished=finished, params_pct=params)


def collect_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every run dir (a dir holding ``config_resolved.yaml``) under ``dirs``, recursively, sorted by path.
    The walk does not descend into a run dir (its checkpoints, adapters, predictions)."""
    found: dict[Path, Run] = {}
    stack = [Path(d) for d in dirs]
    while stack:
        d = stack.pop()
        if not d.is_dir():
            continue
        if RunLayout(d).resolved_config.is_file():
            found.setdefault(d.resolve(), _read_run(d))
            continue
        stack.extend(
            sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        )
    return [found[k] for k in sorted(found)]


def _bbh_file(run_dir: Path, protocol: str | None) -> Path | None:
    layout = RunLayout(run_dir)
    files = sorted(layout.metrics.glob(layout.suite("bbh_*").name))
    if protocol and layout.suite(f"bbh_{protocol}") in files:
        return layout.suite(f"bbh_{protocol}")
    return files[0] if files else None


def metric_file(run_dir: Path, metric: str, bbh_protocol: str | None = None) -> Path | None:
    m = METRICS[metric]
    if m.suite == "bbh":
        return _bbh_file(run_dir, bbh_protocol)
    p = RunLayout(run_dir).suite(m.suite)
    return p if p.exists() else None


def metric_value(
    run_dir: Path, metric: str, bbh_protocol: str | None = None, scale: float = 1.0
) -> tuple[float, dict[str, float], str] | None:
    """(headline, per-task values, source file name) × ``scale``, or None where the run has no such file.
    BBH: ``eval_bbh_<bbh_protocol>.json`` when present, else the run's first ``eval_bbh_*.json``."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    m = METRICS[metric]
    f = metric_file(Path(run_dir), metric, bbh_protocol)
    if f is None:
        return None
    data = json.loads(f.read_text())
    head = select(data, ".".join(m.aggregate))
    if head is None:
        return None
    per_task = {
        t: float(v[m.per_task]) * scale for t, v in (data.get("tasks") or {}).items() if m.per_task in v
    }
    return float(head) * scale, per_task, f.name
