"""scripts/make_tables.py and mtlora.report: fake run dirs -> the paper table (markdown, CSV, LaTeX), the
paper-numbers file, and the plots."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from mtlora.report import aggregate, metric_plots, render, run_dirs
from tests.helpers.scripts import load_script

REPO = Path(__file__).resolve().parents[2]

NUMBERS = {
    "provenance_tags": {"paper": "the paper's text"},
    "cells": {"lora_r10": "LoRA r=10", "a_lora_k": "A-LoRA-K", "hydralora": "HydraLoRA"},
    "papers": {
        "demo": {
            "tables": {
                "t4": {
                    "caption": "Demo BBH table",
                    "citation": "arXiv 0000.00000, Table 4",
                    "provenance": "paper",
                    "metric": "bbh_macro",
                    "bbh_protocol": "align_lora",
                    "scale": 100,
                    "column_by": "model",
                    "columns": ["qwen2.5-7b", "llama3-8b"],
                    "rows": {
                        "lora_r10": {"values": {"qwen2.5-7b": 48.36, "llama3-8b": 44.89}, "params_pct": 0.25},
                        "a_lora_k": {"values": {"qwen2.5-7b": 50.28, "llama3-8b": 48.84}, "params_pct": 0.2},
                        "hydralora": {"values": {"qwen2.5-7b": 47.38}, "note": "router"},
                    },
                },
                "t1": {
                    "caption": "Demo per-task table",
                    "citation": "arXiv 0000.00000, Table 1",
                    "provenance": "paper-2nd",
                    "metric": "heldin_gen_accuracy",
                    "column_by": "task",
                    "model": "qwen2.5-3b",
                    "columns": ["qnli", "avg"],
                    "rows": {"hydralora": {"values": {"qnli": 80.0, "avg": 70.0}}},
                },
                "main": {
                    "caption": "Demo two-protocol table",
                    "citation": "arXiv 0000.00000, main",
                    "provenance": "code",
                    "metric": {"mmlu": "mmlu_micro", "bbh": "bbh_macro"},
                    "column_by": "cell_suffix",
                    "columns": ["mmlu", "bbh"],
                    "rows": {"hydralora": {"values": {"mmlu": 42.4, "bbh": 36.9}}},
                },
            }
        }
    },
}


def fake_run(
    root: Path,
    name: str,
    cell: str,
    seed: int,
    *,
    table: str = "t4",
    model: str = "qwen2.5-7b",
    status: str = "COMPLETED",
    files: dict[str, dict] | None = None,
    rank: int = 8,
    weight: float = 0.0,
    pct: float | None = 0.25,
) -> Path:
    d = root / name
    (d / "metrics").mkdir(parents=True)
    cfg = {
        "report": {"paper": "demo", "table": table, "cell": cell},
        "seed": seed,
        "model": {"name": model},
        "adapter": {"name": "lora", "rank": rank},
        "alignment": {"name": "kl", "weight": weight},
        "data": {"name": "synthetic"},
    }
    (d / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    (d / status).write_text(
        "2026-01-01T00:00:00+00:00\nCUDA out of memory\n" if status == "FAILED" else "t\n"
    )
    if pct is not None:
        (d / "meta.json").write_text(json.dumps({"parameters": {"trainable_pct": pct}}))
    for fname, data in (files or {}).items():
        (d / "metrics" / fname).write_text(json.dumps(data))
    return d


def bbh(macro: float, per_task: dict[str, float] | None = None) -> dict:
    tasks = {
        t: {"n": 10, "accuracy": a} for t, a in (per_task or {"navigate": macro, "snarks": macro}).items()
    }
    return {
        "suite": "bbh",
        "tasks": tasks,
        "macro": {"accuracy": macro},
        "micro": {"accuracy": macro, "n": 20},
    }


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    f = "eval_bbh_align_lora.json"
    fake_run(root, "a/lora_r10/s0", "lora_r10", 0, files={f: bbh(0.47)})
    fake_run(root, "a/lora_r10/s1", "lora_r10", 1, files={f: bbh(0.49)})
    fake_run(
        root, "a/a_lora_k/s0", "a_lora_k", 0, files={f: bbh(0.50, {"navigate": 0.6, "snarks": 0.4})}, pct=0.2
    )
    fake_run(
        root, "a/a_lora_k/s1", "a_lora_k", 1, files={f: bbh(0.52, {"navigate": 0.6, "snarks": 0.44})}, pct=0.2
    )
    fake_run(root, "a/hydralora/s0", "hydralora", 0, status="FAILED")
    fake_run(root, "other/s0", "lora_r10", 0, table="t3", files={f: bbh(0.9)})  # another table: ignored
    return root


EXPECTED_MD = """\
# demo t4: Demo BBH table

Paper: arXiv 0000.00000, Table 4 [paper]. Metric: `bbh_macro` × 100.
Ours: mean ± sample std over seeds (number of runs); Δ = ours − paper; %params ours = trainable share of the run's model (meta.json).

| method | cell | qwen2.5-7b ours | qwen2.5-7b paper | qwen2.5-7b Δ | llama3-8b ours | llama3-8b paper | llama3-8b Δ | %params ours | %params paper |
|---|---|---|---|---|---|---|---|---|---|
| LoRA r=10 | lora_r10 | 48.00 ± 1.41 (2) | 48.36 | -0.36 | – | 44.89 | – | 0.250 | 0.25 |
| A-LoRA-K | a_lora_k | 51.00 ± 1.41 (2) | 50.28 | +0.72 | – | 48.84 | – | 0.200 | 0.20 |
| HydraLoRA | hydralora | – | 47.38 | – | – | – | – | – | – |

Metric files read: `eval_bbh_align_lora.json`.

Paper notes:
- `hydralora`: router

## Failed and missing runs

- FAILED `hydralora` qwen2.5-7b seed 0: `{root}/a/hydralora/s0` (CUDA out of memory)
- missing `lora_r10`: llama3-8b
- missing `a_lora_k`: llama3-8b
- missing `hydralora`: qwen2.5-7b
"""


def build(runs_root: Path, table: str = "t4", numbers: dict = NUMBERS) -> aggregate.Table:
    spec = aggregate.table_spec(numbers, "demo", table)
    return aggregate.build_table(run_dirs.collect_runs([runs_root]), spec, numbers)


def test_collect_runs_finds_every_run_dir_with_its_status(runs_root: Path) -> None:
    runs = run_dirs.collect_runs([runs_root])
    assert len(runs) == 6
    assert sorted(r.status for r in runs).count("completed") == 5
    failed = [r for r in runs if r.status == "failed"]
    assert [(r.cell, r.seed, r.message) for r in failed] == [("hydralora", 0, "CUDA out of memory")]


def test_markdown_is_the_paper_layout_with_mean_std_and_failed_runs(runs_root: Path) -> None:
    table = build(runs_root)
    row = table.rows[1]
    assert (row.cell, row.ours["qwen2.5-7b"].n, row.ours["qwen2.5-7b"].seeds) == ("a_lora_k", 2, [0, 1])
    assert row.ours["qwen2.5-7b"].mean == pytest.approx(51.0)
    assert row.ours["qwen2.5-7b"].std == pytest.approx(2**0.5)
    assert row.delta("qwen2.5-7b") == pytest.approx(0.72)
    assert render.to_markdown(table) == EXPECTED_MD.format(root=runs_root.resolve())


def test_csv_and_latex_shapes(runs_root: Path) -> None:
    table = build(runs_root)
    rows = list(csv.DictReader(io.StringIO(render.to_csv(table))))
    assert list(rows[0]) == render.CSV_COLUMNS
    assert len(rows) == 3 * 2  # rows x columns, long form
    first = rows[0]
    assert (first["cell"], first["column"], first["ours_mean"], first["n"], first["seeds"]) == (
        "lora_r10", "qwen2.5-7b", "48.0000", "2", "0 1",
    )  # fmt: skip
    assert (first["paper_value"], first["delta"], first["provenance"]) == ("48.36", "-0.3600", "paper")
    tex = render.to_latex(table)
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    assert r"\begin{tabular}{lrrrrrrrr}" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 3 and all(line.count("&") == 8 for line in body)
    assert r"51.00 $\pm$ 1.41 (2)" in tex and r"\_" not in body[0]


def test_newest_run_of_a_repeated_seed_wins_and_other_models_get_their_own_column(runs_root: Path) -> None:
    import os

    f = "eval_bbh_align_lora.json"
    old = runs_root / "a/lora_r10/s1"
    new = fake_run(runs_root, "b/lora_r10/s1", "lora_r10", 1, files={f: bbh(0.51)})
    os.utime(new / "COMPLETED", (old.stat().st_mtime + 10,) * 2)
    fake_run(runs_root, "b/tiny", "lora_r10", 0, model="tiny", files={f: bbh(0.1)})
    table = build(runs_root)
    assert table.columns == ["qwen2.5-7b", "llama3-8b", "tiny"]
    assert table.rows[0].ours["qwen2.5-7b"].mean == pytest.approx(49.0)
    assert table.rows[0].ours["tiny"].mean == pytest.approx(10.0)
    assert [r.path for r in table.superseded] == [old.resolve()]


def test_task_and_cell_suffix_tables(tmp_path: Path) -> None:
    gen = {
        "tasks": {"qnli": {"accuracy": 0.8}, "piqa": {"accuracy": 0.6}},
        "macro": {"accuracy": 0.7},
        "micro": {"accuracy": 0.7, "n": 8},
    }
    fake_run(
        tmp_path, "t1", "hydralora", 0, table="t1", model="qwen2.5-3b", files={"eval_heldin_gen.json": gen}
    )
    t1 = build(tmp_path, "t1")
    assert t1.columns == ["qnli", "piqa", "avg"]  # our extra task before the average
    assert [t1.rows[0].ours[c].mean for c in t1.columns] == pytest.approx([80.0, 60.0, 70.0])
    mmlu = {"tasks": {}, "macro": {"accuracy": 0.4}, "micro": {"accuracy": 0.42, "n": 5}}
    fake_run(tmp_path, "m1", "hydralora_mmlu", 0, table="main", files={"eval_mmlu.json": mmlu})
    fake_run(
        tmp_path, "m2", "hydralora_bbh", 0, table="main", files={"eval_bbh_mtlora_direct.json": bbh(0.3)}
    )
    main = build(tmp_path, "main")
    assert [r.cell for r in main.rows] == ["hydralora"]
    assert main.rows[0].ours["mmlu"].mean == pytest.approx(42.0)
    assert main.rows[0].ours["bbh"].mean == pytest.approx(30.0)  # the only BBH protocol the run has


def test_paper_numbers_file_loads_and_every_table_is_cited() -> None:
    numbers = aggregate.load_paper_numbers()
    n = 0
    for paper in numbers["papers"].values():
        for t in (paper.get("tables") or {}).values():
            n += 1
            assert t["citation"] and t["caption"]
            has_values = any((r or {}).get("values") for r in t["rows"].values())
            assert t["provenance"] in (
                aggregate.PROVENANCE_TAGS if has_values else (*aggregate.PROVENANCE_TAGS, "none")
            )
            metrics = t["metric"].values() if isinstance(t["metric"], dict) else [t["metric"]]
            assert all(m is None or m in run_dirs.METRICS for m in metrics)
    assert n >= 15
    t4 = aggregate.table_spec(numbers, "align_lora", "t4")
    assert t4["rows"]["a_lora_k"]["values"]["qwen2.5-7b"] == 50.28
    # every preset's report cell is a row (or, for cell_suffix tables, a row + column) of its table
    for preset in (REPO / "conf/experiment").glob("*/*/*.yaml"):
        report = yaml.safe_load(preset.read_text()).get("report")
        if not report or report["paper"] not in numbers["papers"]:
            continue
        spec = aggregate.table_spec(numbers, report["paper"], report["table"])
        cell = report["cell"]
        if spec.get("column_by") == "cell_suffix":
            cell = next((cell[: -len(c) - 1] for c in spec["columns"] if cell.endswith("_" + c)), cell)
        assert cell in spec["rows"], f"{preset}: cell {cell!r} not in {report['paper']}/{report['table']}"


def test_plots_are_written(tmp_path: Path) -> None:
    f = "eval_heldin.json"
    for rank, seed, em in [(2, 0, 0.1), (2, 1, 0.2), (8, 0, 0.4), (8, 1, 0.5)]:
        data = {
            "tasks": {"a": {"exact_match": em}, "b": {"exact_match": em / 2}},
            "macro": {"exact_match": em},
        }
        fake_run(
            tmp_path,
            f"r{rank}s{seed}",
            "lora",
            seed,
            table="sweep",
            rank=rank,
            weight=rank / 10,
            files={f: data},
        )
    runs = run_dirs.collect_runs([tmp_path])
    for png in (
        metric_plots.plot_curve(
            runs, "heldin_exact_match", "adapter.rank", tmp_path / "out/rank.png", log_base=2
        ),
        metric_plots.plot_curve(runs, "heldin_exact_match", "alignment.weight", tmp_path / "out/lambda.png"),
        metric_plots.plot_per_task(runs, "heldin_exact_match", tmp_path / "out/per_task.png"),
    ):
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    summary = aggregate.build_summary(runs, "heldin_exact_match", ["adapter.rank"])
    assert [(g["adapter.rank"], round(g["stat"].mean, 6), g["stat"].n) for g in summary] == [
        (2, 15.0, 2),
        (8, 45.0, 2),
    ]


def test_script_main_writes_the_reports(runs_root: Path, tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text(yaml.safe_dump(NUMBERS, allow_unicode=True, sort_keys=False))
    mod = load_script("make_tables")
    out = tmp_path / "report"
    argv = [
        "--runs",
        str(runs_root),
        "--paper",
        "demo",
        "--table",
        "t4",
        "--out",
        str(out),
        "--numbers",
        str(numbers),
    ]
    assert mod.main([*argv, "--plot", "per-task"]) == 0
    assert (out / "table.md").read_text() == EXPECTED_MD.format(root=runs_root.resolve())
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "table.tex", "per_task.png"}
    with pytest.raises(SystemExit):
        mod.main(["--runs", str(runs_root), "--paper", "demo", "--out", str(out)])


def test_base_row_is_filled_from_a_base_model_evaluation_run_dir(tmp_path: Path) -> None:
    """A Base row's run dir (``python -m mtlora.evaluate experiment=<paper>/<table>/base out=DIR``: adapter
    ``none``, no meta.json parameters) fills the paper's Base cell; its %params stay empty."""
    numbers = aggregate.load_paper_numbers()
    d = tmp_path / "hydralora_t3" / "llama2-7b" / "base" / "s41"
    (d / "metrics").mkdir(parents=True)
    cfg = {
        "report": {"paper": "hydralora", "table": "t3", "cell": "base"},
        "seed": 41,
        "model": {"name": "llama2-7b"},
        "adapter": {"name": "none", "method": "none"},
    }
    (d / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    (d / "COMPLETED").write_text("t\n")
    (d / "meta.json").write_text(json.dumps({"config_hash": "x"}))
    (d / "metrics" / "eval_bbh_opencompass_cot.json").write_text(json.dumps(bbh(0.3)))
    table = aggregate.build_table(
        run_dirs.collect_runs([tmp_path]), aggregate.table_spec(numbers, "hydralora", "t3"), numbers
    )
    base = table.rows[0]
    assert base.cell == "base" and base.ours["llama2-7b"].mean == pytest.approx(30.0)
    assert base.delta("llama2-7b") == pytest.approx(30.0 - 31.6) and base.params_ours == {}
    assert ("base", ["llama2-7b"]) not in table.missing
    assert "| Base (no adapter) | base | 30.00 (1) | 31.60 | -1.60 |" in render.to_markdown(table)


def test_sweep_summaries_plot_lambda_and_heads(tmp_path: Path) -> None:
    mod = load_script("make_tables")
    f = "eval_heldin.json"
    for i, (heads, weight) in enumerate([(1, 0.01), (3, 0.1), (10, 0.5)]):
        d = fake_run(tmp_path / "runs", f"j{i}", "hydralora", 0, table="sweep", weight=weight, files={f: {}})
        cfg = yaml.safe_load((d / "config_resolved.yaml").read_text())
        cfg["adapter"]["num_heads"] = heads
        (d / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
        (d / "metrics" / f).write_text(json.dumps({"tasks": {}, "macro": {"exact_match": 0.1 * (i + 1)}}))
    for plot, key in (("heads", "adapter.num_heads"), ("lambda", "alignment.weight")):
        out = tmp_path / plot
        argv = ["--runs", str(tmp_path / "runs"), "--metric", "heldin_exact_match", "--group-by", key]
        assert mod.main([*argv, "--plot", plot, "--out", str(out)]) == 0
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        rows = list(csv.DictReader((out / "summary.csv").open()))
        assert [(r[key], round(float(r["mean"]), 6)) for r in rows] == [
            (str(x), y)
            for x, y in zip((1, 3, 10) if plot == "heads" else (0.01, 0.1, 0.5), (10.0, 20.0, 30.0))
        ]


def test_csv_writes_paper_values_as_given_and_quotes_commas(runs_root: Path) -> None:
    numbers = copy.deepcopy(NUMBERS)
    numbers["papers"]["demo"]["tables"]["t4"]["rows"]["lora_r10"]["values"]["qwen2.5-7b"] = 48
    lines = render.to_csv(build(runs_root, numbers=numbers)).splitlines()
    assert lines[0] == ",".join(render.CSV_COLUMNS)
    assert lines[1] == (
        "demo,t4,lora_r10,LoRA r=10,qwen2.5-7b,qwen2.5-7b,bbh_macro,48.0000,1.4142,2,0 1,48,0.0000,0.2500,0.25,"
        'paper,"arXiv 0000.00000, Table 4"'
    )
    assert lines[2].split(",")[11] == "44.89"  # a float paper value as written
