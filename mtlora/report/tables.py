"""Collect finished run dirs into a paper table: our mean ± std over seeds beside the paper's number.

Pure functions (no argparse, no plotting), used by scripts/make_tables.py:

- :func:`load_paper_numbers` reads ``docs/paper_numbers.yaml`` (the papers' reported numbers, with
  citations and provenance tags; its header documents the schema).
- :func:`collect_runs` walks directories for run dirs (a ``config_resolved.yaml``), with their status
  (``COMPLETED`` / ``FAILED`` / ``RUNNING`` marker), ``report: {paper, table, cell}``, model, seed and
  trainable-parameter share (``meta.json``).
- :func:`metric_value` reads one metric (``METRICS``) from a run's ``metrics/eval_<suite>.json``.
- :func:`build_table` groups the matching runs by (cell, column) over seeds and lays them out as the
  paper's table; :func:`to_markdown`, :func:`to_csv`, :func:`to_latex` render it.
- :func:`build_summary` / :func:`summary_markdown`: the same aggregation without a paper table (sweeps).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlora.run.layout import RunLayout
from mtlora.run.rundir import MARKERS
from mtlora.utils.paths import REPO_ROOT

PAPER_NUMBERS = REPO_ROOT / "docs" / "paper_numbers.yaml"
PROVENANCE_TAGS = ("paper", "paper-2nd", "code")  # `none`: a table without retrievable numbers


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


# ----------------------------------------------------------------------------------------------- inputs


def load_paper_numbers(path: str | Path | None = None) -> dict:
    """The papers' numbers (docs/paper_numbers.yaml), checked: every table has caption, citation, a known
    provenance tag, columns, and rows whose values use only those columns."""
    path = Path(path) if path else PAPER_NUMBERS
    data = yaml.safe_load(Path(path).read_text())
    cells = data.get("cells") or {}
    for pid, paper in data["papers"].items():
        for tid, t in (paper.get("tables") or {}).items():
            where = f"{path}: {pid}.{tid}"
            for key in ("caption", "citation", "provenance", "columns", "rows"):
                if not t.get(key):
                    raise ValueError(f"{where}: missing {key!r}")
            has_values = any((row or {}).get("values") for row in t["rows"].values())
            if t["provenance"] not in PROVENANCE_TAGS and not (t["provenance"] == "none" and not has_values):
                raise ValueError(f"{where}: provenance {t['provenance']!r} not in {PROVENANCE_TAGS}")
            for cid, row in t["rows"].items():
                row = row or {}
                if cid not in cells:
                    raise ValueError(f"{where}: cell {cid!r} not listed under `cells`")
                unknown = set(row.get("values") or {}) - set(t["columns"])
                if unknown:
                    raise ValueError(f"{where}.{cid}: values for unknown columns {sorted(unknown)}")
    return data


def table_spec(numbers: dict, paper: str, table: str) -> dict:
    tables = (numbers["papers"].get(paper) or {}).get("tables") or {}
    if paper not in numbers["papers"] or table not in tables:
        known = [f"{p}/{t}" for p, v in numbers["papers"].items() for t in (v.get("tables") or {})]
        raise KeyError(f"no table {paper}/{table} in the paper numbers; known: {', '.join(known)}")
    return {"paper": paper, "table": table, **tables[table]}


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


# ------------------------------------------------------------------------------------------ aggregation


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (ddof=1); None for a single run
    n: int
    seeds: list = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float], seeds: Sequence = ()) -> Stat:
        vals = [float(v) for v in values]
        std = statistics.stdev(vals) if len(vals) > 1 else None
        return cls(statistics.fmean(vals), std, len(vals), list(seeds))


def fmt_num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_stat(s: Stat | None, digits: int = 2) -> str:
    if s is None:
        return "–"
    if s.std is None:
        return f"{s.mean:.{digits}f} ({s.n})"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} ({s.n})"


def fmt_delta(d: float | None, digits: int = 2) -> str:
    return "–" if d is None else f"{d:+.{digits}f}"


@dataclass
class Row:
    cell: str
    label: str
    model: str | None  # task tables: the model of our runs when it is not the paper's
    ours: dict[str, Stat | None]
    paper: dict[str, float | None]
    params_ours: dict[str, Stat]  # per column (task tables: one entry "")
    params_paper: Any = None
    note: str = ""

    def delta(self, col: str) -> float | None:
        o, p = self.ours.get(col), self.paper.get(col)
        return None if o is None or p is None else o.mean - p


@dataclass
class Table:
    spec: dict
    metric: Any  # str or {column: str}
    columns: list[str]
    labels: dict[str, str]
    rows: list[Row]
    failed: list[Run]
    unfinished: list[Run]
    no_metric: list[tuple[Run, str]]
    missing: list[tuple[str, list[str]]]  # (cell, columns with a paper number and no finished run)
    sources: list[str]  # metric files read (e.g. eval_bbh_align_lora.json)
    superseded: list[Run]

    @property
    def title(self) -> str:
        return f"{self.spec['paper']} {self.spec['table']}"


def _metric_for(metric: Any, col: str) -> str | None:
    return metric.get(col) if isinstance(metric, dict) else metric


def _row_and_column(run: Run, column_by: str, columns: Sequence[str]) -> tuple[str, str]:
    """(row cell id, column) of a run in a non-task table."""
    if column_by == "cell_suffix":
        for c in sorted(columns, key=len, reverse=True):
            if run.cell.endswith("_" + c):
                return run.cell[: -len(c) - 1], c
        return run.cell, "?"
    path = {"model": "model.name", "data": "data.name"}.get(column_by, column_by)
    return run.cell, str(select(run.cfg, path, "?"))


def build_table(
    runs: Sequence[Run], spec: dict, numbers: dict | None = None, metric: str | None = None
) -> Table:
    """Lay the runs of ``spec`` (a :func:`table_spec`) out as the paper's table.

    Rows: the paper's cells in its order, then cells only we ran. Columns (``column_by``): model / data /
    config path values (the paper's, then any other our runs used), or the tasks of one run (``task``,
    ``avg`` = the macro). Our value = mean ± sample std over seeds; a repeated (cell, column, seed) keeps
    the newest finished run. ``metric`` overrides the table's metric for every column."""
    paper, table = spec["paper"], spec["table"]
    cells_lbl = (numbers or {}).get("cells") or {}
    metric_spec = metric or spec.get("metric")
    scale = float(spec.get("scale", 100))
    protocol = spec.get("bbh_protocol")
    column_by = spec.get("column_by", "model")
    mine = [r for r in runs if r.paper == paper and r.table == table]
    failed = [r for r in mine if r.status == "failed"]
    unfinished = [r for r in mine if r.status in ("running", "unknown")]
    done = [r for r in mine if r.status == "completed"]
    columns = list(spec["columns"])
    labels = {c: str((spec.get("column_labels") or {}).get(c, c)) for c in columns}

    # (row key, column, seed) -> (run, value); row key = cell, or (cell, model) for task tables
    picked: dict[tuple, tuple[Run, float]] = {}
    superseded: list[Run] = []
    no_metric: list[tuple[Run, str]] = []
    sources: set[str] = set()

    def put(key: tuple, run: Run, value: float) -> None:
        old = picked.get(key)
        if old is not None:
            keep, drop = (run, old[0]) if run.finished >= old[0].finished else (old[0], run)
            superseded.append(drop)
            if keep is old[0]:
                return
        picked[key] = (run, value)

    for run in done:
        if column_by == "task":
            row_key = (run.cell, run.model)
            name = _metric_for(metric_spec, "avg")
            got = metric_value(run.path, name, protocol, scale) if name else None
            if got is None:
                no_metric.append((run, str(name)))
                continue
            head, per_task, src = got
            sources.add(src)
            task_map = spec.get("task_map") or {}
            for task in per_task:  # our tasks the paper has no column for
                col = next((c for c, t in task_map.items() if t == task), task)
                if col not in columns:
                    columns.insert(columns.index("avg") if "avg" in columns else len(columns), col)
                    labels[col] = col
            for col in columns:
                v = head if col == "avg" else per_task.get(task_map.get(col, col))
                if v is not None:
                    put((row_key, col, run.seed), run, v)
            continue
        cell, col = _row_and_column(run, column_by, spec["columns"])
        if col not in columns:
            columns.append(col)
            labels[col] = col
        name = _metric_for(metric_spec, col)
        got = metric_value(run.path, name, protocol, scale) if name else None
        if got is None:
            no_metric.append((run, str(name)))
            continue
        sources.add(got[2])
        put((cell, col, run.seed), run, got[0])

    # row keys in paper order, then ours
    paper_rows = spec["rows"]
    if column_by == "task":
        run_keys = {(r.cell, r.model) for r in mine}
    else:
        run_keys = {_row_and_column(r, column_by, spec["columns"])[0] for r in mine}
    order = {c: i for i, c in enumerate(spec["rows"])}

    def rank(k: Any) -> tuple:
        cell = k[0] if column_by == "task" else k
        return (order.get(cell, len(order)), str(k))

    ours_keys = sorted({k[0] for k in picked} | run_keys, key=rank)
    if column_by == "task":
        pmodel = spec.get("model")
        keys = [(c, pmodel) for c in paper_rows]
        keys += [k for k in ours_keys if k not in keys and k[0] in paper_rows]
        keys += [k for k in ours_keys if k not in keys]
    else:
        keys = list(paper_rows) + [k for k in ours_keys if k not in paper_rows]

    rows: list[Row] = []
    for key in keys:
        cell, model = key if column_by == "task" else (key, None)
        prow = paper_rows.get(cell) or {}  # a row of `rows: {x: {}}` is None
        is_paper_model = column_by != "task" or model == spec.get("model")
        ours: dict[str, Stat | None] = {}
        params: dict[str, Stat] = {}
        for col in columns:
            hits = sorted(
                ((k[2], v) for k, v in picked.items() if k[0] == key and k[1] == col), key=lambda x: str(x[0])
            )
            ours[col] = Stat.of([v[1] for _, v in hits], [s for s, _ in hits]) if hits else None
            pp = [v[0].params_pct for _, v in hits if v[0].params_pct is not None]
            pcol = "" if column_by == "task" else col
            if pp and pcol not in params:
                params[pcol] = Stat.of(pp)
        paper_vals = {c: (prow.get("values") or {}).get(c) if is_paper_model else None for c in columns}
        rows.append(
            Row(
                cell=cell,
                label=str(prow.get("label") or cells_lbl.get(cell) or cell),
                model=None if is_paper_model else model,
                ours=ours,
                paper=paper_vals,
                params_ours=params,
                params_paper=prow.get("params_pct") if is_paper_model else None,
                note=str(prow.get("note") or ""),
            )
        )
    missing = []
    for row in rows:
        cols = [c for c in columns if row.paper.get(c) is not None and row.ours.get(c) is None]
        if cols:
            missing.append((row.cell, cols))
    return Table(
        spec=spec,
        metric=metric_spec,
        columns=columns,
        labels=labels,
        rows=rows,
        failed=failed,
        unfinished=unfinished,
        no_metric=no_metric,
        missing=missing,
        sources=sorted(sources),
        superseded=superseded,
    )


# ------------------------------------------------------------------------------------------- rendering


def _metric_text(metric: Any) -> str:
    if isinstance(metric, dict):
        return ", ".join(f"{c}: `{m}`" for c, m in metric.items())
    return f"`{metric}`"


def _pct(v: float) -> str:
    return f"{v:.2f}" if round(v, 2) == v else f"{v:.3f}"


def _params_paper(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return " / ".join(f"{c}: {_pct(x)}" for c, x in v.items())
    return _pct(v)


def _params_ours(row: Row, columns: Sequence[str]) -> str:
    order = [c for c in [""] + list(columns) if c in row.params_ours]
    return " / ".join(fmt_num(row.params_ours[c].mean, 3) for c in order) if order else "–"


def _row_name(row: Row) -> str:
    return f"{row.label} [{row.model}]" if row.model else row.label


def header_cells(table: Table) -> list[str]:
    cols = ["method", "cell"]
    for c in table.columns:
        cols += [f"{table.labels[c]} ours", f"{table.labels[c]} paper", f"{table.labels[c]} Δ"]
    return cols + ["%params ours", "%params paper"]


def body_cells(table: Table, row: Row) -> list[str]:
    out = [_row_name(row), row.cell]
    for c in table.columns:
        out += [fmt_stat(row.ours.get(c)), fmt_num(row.paper.get(c)), fmt_delta(row.delta(c))]
    return out + [_params_ours(row, table.columns), _params_paper(row.params_paper)]


def to_markdown(table: Table) -> str:
    s = table.spec
    scale = s.get("scale", 100)
    lines = [
        f"# {table.title}: {s['caption']}",
        "",
        f"Paper: {s['citation']} [{s['provenance']}]. Metric: {_metric_text(table.metric)} × {scale}"
        + (f"; paper model: {s['model']}" if s.get("model") else "")
        + ".",
        "Ours: mean ± sample std over seeds (number of runs); Δ = ours − paper; %params ours = trainable share "
        "of the run's model (meta.json).",
        "",
    ]
    head = header_cells(table)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(body_cells(table, r)) + " |" for r in table.rows]
    if table.sources:
        lines += ["", "Metric files read: " + ", ".join(f"`{x}`" for x in table.sources) + "."]
    notes = [f"- `{r.cell}`: {r.note}" for r in table.rows if r.note and r.model is None]
    if notes:
        lines += ["", "Paper notes:", *notes]
    lines += ["", "## Failed and missing runs", ""]
    problems = []
    for r in table.failed:
        problems.append(
            f"- FAILED `{r.cell}` {r.model} seed {r.seed}: `{r.path}`"
            + (f" ({r.message})" if r.message else "")
        )
    for r in table.unfinished:
        problems.append(f"- unfinished ({r.status}) `{r.cell}` {r.model} seed {r.seed}: `{r.path}`")
    for r, name in table.no_metric:
        problems.append(f"- no `{name}` metrics file: `{r.cell}` {r.model} seed {r.seed}: `{r.path}`")
    for cell, cols in table.missing:
        problems.append(f"- missing `{cell}`: " + ", ".join(table.labels[c] for c in cols))
    for r in table.superseded:
        problems.append(f"- superseded by a newer run of the same seed: `{r.path}`")
    lines += problems or ["- none"]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "paper", "table", "cell", "method", "model", "column", "metric", "ours_mean", "ours_std", "n", "seeds",
    "paper_value", "delta", "params_pct_ours", "params_pct_paper", "provenance", "citation",
]  # fmt: skip


def to_csv(table: Table) -> str:
    """Long form: one line per (row, column)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    s = table.spec
    for row in table.rows:
        for c in table.columns:
            o = row.ours.get(c)
            pp = row.params_paper.get(c) if isinstance(row.params_paper, dict) else row.params_paper
            po = row.params_ours.get("" if s.get("column_by") == "task" else c)
            w.writerow(
                {
                    "paper": s["paper"],
                    "table": s["table"],
                    "cell": row.cell,
                    "method": row.label,
                    "model": row.model
                    or (c if s.get("column_by", "model") == "model" else s.get("model", "")),
                    "column": c,
                    "metric": _metric_for(table.metric, "avg" if s.get("column_by") == "task" else c) or "",
                    "ours_mean": "" if o is None else f"{o.mean:.4f}",
                    "ours_std": "" if o is None or o.std is None else f"{o.std:.4f}",
                    "n": 0 if o is None else o.n,
                    "seeds": "" if o is None else " ".join(str(x) for x in o.seeds),
                    "paper_value": "" if row.paper.get(c) is None else row.paper[c],
                    "delta": "" if row.delta(c) is None else f"{row.delta(c):.4f}",
                    "params_pct_ours": "" if po is None else f"{po.mean:.4f}",
                    "params_pct_paper": "" if pp is None else pp,
                    "provenance": s["provenance"],
                    "citation": s["citation"],
                }
            )
    return buf.getvalue()


def latex_escape(text: str) -> str:
    rep = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
    }
    out = "".join(rep.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--").replace("†", r"$^\dagger$")


def to_latex(table: Table) -> str:
    """A booktabs table: per column a group (ours, paper, Δ) under the paper's header."""
    s = table.spec
    k = len(table.columns)
    spec = "l" + "rrr" * k + "rr"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(s['caption'])} (paper: {latex_escape(s['citation'])}, [{s['provenance']}]). "
        r"Ours: mean $\pm$ std over seeds (runs).}",
        rf"\label{{tab:{s['paper']}_{s['table']}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(
            ["Method"]
            + [rf"\multicolumn{{3}}{{c}}{{{latex_escape(table.labels[c])}}}" for c in table.columns]
        )
        + r" & \multicolumn{2}{c}{\%params} \\",
        "".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(k))
        + rf"\cmidrule(lr){{{2 + 3 * k}-{3 + 3 * k}}}",
        " & ".join([""] + ["ours & paper & $\\Delta$"] * k + ["ours & paper"]) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        cells = body_cells(table, row)
        cells = [cells[0]] + cells[2:]  # drop the cell id column
        lines.append(" & ".join(latex_escape(x) for x in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ summaries without a table


def build_summary(
    runs: Sequence[Run],
    metric: str,
    group_by: Sequence[str] = (),
    scale: float = 100.0,
    bbh_protocol: str | None = None,
) -> list[dict]:
    """Finished runs grouped by (cell, model, *group_by config paths) over seeds: one dict per group with
    the keys, ``stat`` (:class:`Stat`) and ``per_task`` ({task: Stat})."""
    groups: dict[tuple, list[tuple[Any, float, dict]]] = {}
    for r in runs:
        if r.status != "completed":
            continue
        got = metric_value(r.path, metric, bbh_protocol, scale)
        if got is None:
            continue
        key = (r.cell, r.model, *(select(r.cfg, g) for g in group_by))
        groups.setdefault(key, []).append((r.seed, got[0], got[1]))
    out = []
    for key in sorted(
        groups, key=lambda k: tuple((x is None, str(x) if not isinstance(x, int | float) else x) for x in k)
    ):
        hits = sorted(groups[key], key=lambda x: str(x[0]))
        tasks = sorted({t for _, _, pt in hits for t in pt})
        out.append(
            {
                "cell": key[0],
                "model": key[1],
                **dict(zip(group_by, key[2:])),
                "stat": Stat.of([h[1] for h in hits], [h[0] for h in hits]),
                "per_task": {t: Stat.of([pt[t] for _, _, pt in hits if t in pt]) for t in tasks},
            }
        )
    return out


def summary_markdown(
    summary: Sequence[dict], metric: str, group_by: Sequence[str] = (), scale: float = 100.0
) -> str:
    cols = ["cell", "model", *group_by, "ours", "seeds"]
    lines = [
        f"# Runs: `{metric}` × {scale:g}",
        "",
        "Mean ± sample std over seeds (number of runs).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for g in summary:
        vals = [
            g["cell"],
            g["model"],
            *(g[k] for k in group_by),
            fmt_stat(g["stat"]),
            " ".join(map(str, g["stat"].seeds)),
        ]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"
