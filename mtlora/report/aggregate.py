"""Collect a paper table from the runs: the paper's numbers (``docs/paper_numbers.yaml``,
:func:`load_paper_numbers` / :func:`table_spec`), matching runs grouped by (cell, column) over seeds into
:class:`Table` (:func:`build_table`), and the same aggregation without a paper table (:func:`build_summary`,
sweeps)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlora.report.run_dirs import Run, metric_value, select
from mtlora.utils.paths import REPO_ROOT

PAPER_NUMBERS = REPO_ROOT / "docs" / "paper_numbers.yaml"
PROVENANCE_TAGS = ("paper", "paper-2nd", "code")  # `none`: a table without retrievable numbers


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


def metric_for(metric: Any, col: str) -> str | None:
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
            name = metric_for(metric_spec, "avg")
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
        name = metric_for(metric_spec, col)
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
