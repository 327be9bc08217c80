"""Render a collected :class:`~mtlora.report.aggregate.Table`: markdown (with the failed and missing runs),
long-form CSV (pandas) and a booktabs LaTeX table; :func:`summary_markdown` renders a summary of runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtlora.report.aggregate import Row, Table, fmt_delta, fmt_num, fmt_stat, metric_for


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
    """Long form: one line per (row, column). Cells are kept as objects (no dtype inference), so that a
    paper value is written as given (``52`` stays ``52``, not ``52.0``)."""
    import pandas as pd  # a dependency of datasets; imported here, the report's other writers need none

    records = []
    s = table.spec
    for row in table.rows:
        for c in table.columns:
            o = row.ours.get(c)
            pp = row.params_paper.get(c) if isinstance(row.params_paper, dict) else row.params_paper
            po = row.params_ours.get("" if s.get("column_by") == "task" else c)
            records.append(
                {
                    "paper": s["paper"],
                    "table": s["table"],
                    "cell": row.cell,
                    "method": row.label,
                    "model": row.model
                    or (c if s.get("column_by", "model") == "model" else s.get("model", "")),
                    "column": c,
                    "metric": metric_for(table.metric, "avg" if s.get("column_by") == "task" else c) or "",
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
    frame = pd.DataFrame(records, columns=CSV_COLUMNS, dtype=object)
    return frame.to_csv(index=False, lineterminator="\n")


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
