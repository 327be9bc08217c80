#!/usr/bin/env python
"""Collect finished run dirs into a paper's table, with the paper's numbers beside ours, and plots.

    python scripts/make_tables.py --runs outputs/tables/align_lora_t4 --paper align_lora --table t4 \
        --out reports/align_lora_t4 [--metric bbh_macro] [--plot rank --plot lambda --plot per-task]
    python scripts/make_tables.py --runs outputs/train/multiruns/X --out reports/sweep --plot rank \
        --metric heldin_exact_match --group-by adapter.rank      # no paper table: a summary
    (`make sweep-ranks|sweep-lambda|sweep-heads` run a sweep, then this with --plot rank|lambda|heads)

Runs are dirs with a ``config_resolved.yaml`` (searched recursively); those with a ``COMPLETED`` marker and
``report: {paper, table}`` equal to --paper/--table are grouped by (cell, column) over seeds. The papers'
numbers and citations come from docs/paper_numbers.yaml (--numbers). Writes into --out: ``table.md``,
``table.csv`` (long form), ``table.tex`` (booktabs), or ``summary.{md,csv}`` without a table, and
``<plot>.png``. Logic: mtlora.report (run_dirs, aggregate, render, metric_plots).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without installing the package
    sys.path.insert(0, str(REPO))

from mtlora.report import aggregate, metric_plots, render, run_dirs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run dirs or dirs holding run dirs")
    p.add_argument("--paper", help="paper id (docs/paper_numbers.yaml), e.g. align_lora")
    p.add_argument("--table", help="table id, e.g. t4")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--metric", choices=sorted(run_dirs.METRICS), help="override the table's metric")
    p.add_argument("--numbers", help="paper numbers file (default docs/paper_numbers.yaml)")
    p.add_argument("--plot", action="append", default=[], choices=[*metric_plots.CURVES, "per-task"])
    p.add_argument("--group-by", nargs="*", default=[], help="summary mode: extra config paths to group by")
    p.add_argument("--scale", type=float, help="summary mode / plots: metric multiplier (default 100)")
    a = p.parse_args(argv)
    if bool(a.paper) != bool(a.table):
        p.error("--paper and --table go together")
    if not a.paper and not a.metric:
        p.error("without --paper/--table, give --metric")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_dirs.collect_runs(a.runs)
    protocol = None
    if a.paper:
        numbers = aggregate.load_paper_numbers(a.numbers)
        spec = aggregate.table_spec(numbers, a.paper, a.table)
        table = aggregate.build_table(runs, spec, numbers, a.metric)
        md = render.to_markdown(table)
        (out / "table.md").write_text(md)
        (out / "table.csv").write_text(render.to_csv(table))
        (out / "table.tex").write_text(render.to_latex(table))
        runs = [r for r in runs if r.paper == a.paper and r.table == a.table]
        protocol = spec.get("bbh_protocol")
        scale = a.scale or float(spec.get("scale", 100))
        metric = a.metric or spec.get("metric")
        if isinstance(metric, dict):  # plots need one metric: the first column's
            metric = next((m for m in metric.values() if m), None)
    else:
        scale = a.scale or 100.0
        metric = a.metric
        summary = aggregate.build_summary(runs, metric, a.group_by, scale)
        md = render.summary_markdown(summary, metric, a.group_by, scale)
        (out / "summary.md").write_text(md)
        with (out / "summary.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["cell", "model", *a.group_by, "mean", "std", "n", "seeds"])
            for g in summary:
                s = g["stat"]
                w.writerow(
                    [
                        g["cell"],
                        g["model"],
                        *(g[k] for k in a.group_by),
                        s.mean,
                        s.std,
                        s.n,
                        " ".join(map(str, s.seeds)),
                    ]
                )
    print(md)
    for name in a.plot:
        if metric is None:
            print(f"plot {name}: the table has no metric", file=sys.stderr)
            continue
        png = out / f"{name.replace('-', '_')}.png"
        if name == "per-task":
            done = metric_plots.plot_per_task(runs, metric, png, scale, protocol)
        else:
            x_path, xlabel, log_base = metric_plots.CURVES[name]
            done = metric_plots.plot_curve(
                runs, metric, x_path, png, xlabel, scale, protocol, log_base=log_base
            )
        print(
            f"plot {name}: {done}" if done else f"plot {name}: no finished runs with {metric}",
            file=sys.stderr,
        )
    print(f"written to {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from mtlora.cli.entry import run_main

    sys.exit(run_main(main))  # a user error: one line, exit status 2
