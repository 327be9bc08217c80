"""The files every evaluation suite writes (metrics tables and per-example predictions), and keeping the
files of an earlier evaluation when a later one writes into the same dir."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from mtlora.run.layout import EARLIER_EVALS, RunLayout
from mtlora.run.metrics import markdown_table, write_csv
from mtlora.utils.io import atomic_write_text

#: the columns of the held-in (teacher-forced) table
HELDIN_COLUMNS = ["task", "n", "loss", "token_acc", "exact_match"]


def write_heldin(result: dict, out_dir: Path) -> str:
    """``metrics/eval_heldin.json`` and ``.md`` (per-task rows, then ``macro`` and ``micro``) of a held-in
    result; returns the markdown table. Training, LoraHub and ``mtlora.evaluate`` all write it here."""
    layout = RunLayout(out_dir)
    layout.metrics.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.suite("heldin"), json.dumps(result, indent=2))
    table = [{"task": t, **m} for t, m in result["tasks"].items()]
    table += [{"task": "macro", **result["macro"]}, {"task": "micro", **result["micro"]}]
    md = markdown_table(table, HELDIN_COLUMNS)
    atomic_write_text(layout.suite("heldin", "md"), md + "\n")
    return md


def write_suite_outputs(
    name: str, result: dict, cols: list[str], note: str, preds: dict[str, list[dict]], out_dir: Path
) -> None:
    """``metrics/eval_<name>.{json,csv,md}`` (per-task rows, then ``macro`` and ``micro``) and
    ``predictions/<name>/<task>.jsonl``."""
    layout = RunLayout(out_dir)
    layout.metrics.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.suite(name), json.dumps(result, indent=2))
    rows = [{"task": t, **m} for t, m in result["tasks"].items()]
    for agg in ("macro", "micro"):  # n = all rows, as in the BBH tables
        rows.append(
            {"task": agg, **{k: v for k, v in result[agg].items() if k != "n"}, "n": result["micro"]["n"]}
        )
    rows += [{"task": g, **m} for g, m in result.get("groups", {}).items()]  # e.g. MMLU categories
    table = [{c: r.get(c, "") for c in cols} for r in rows]
    write_csv(layout.suite(name, "csv"), table)
    atomic_write_text(layout.suite(name, "md"), note + "\n\n" + markdown_table(table, cols) + "\n")
    write_predictions(name, preds, out_dir)


def write_predictions(name: str, preds: dict[str, list[dict]], out_dir: Path) -> Path:
    """``predictions/<name>/<task>.jsonl``, one JSON line per example."""
    pdir = RunLayout(out_dir).suite_predictions(name)
    pdir.mkdir(parents=True, exist_ok=True)
    for task, lines in preds.items():
        atomic_write_text(pdir / f"{task}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return pdir


#: where :func:`keep_earlier_results` moves earlier outputs, under the evaluated dir
EARLIER_DIR = EARLIER_EVALS


def suite_files(out_dir: Path, name: str) -> list[Path]:
    """The existing outputs of suite ``name`` in ``out_dir``: ``metrics/eval_<name>.*`` and ``predictions/<name>/``."""
    layout = RunLayout(out_dir)
    files = sorted(layout.metrics.glob(layout.suite(name, "*").name))
    pdir = layout.suite_predictions(name)
    return files + ([pdir] if pdir.is_dir() else [])


def keep_earlier_results(out_dir: Path, names: list[str]) -> list[Path]:
    """Move the existing outputs of the suites ``names`` to ``earlier_evals/<time>/`` (same layout below it;
    ``<time>``: when the earlier ``metrics/eval_<name>.json`` was written, ``%Y-%m-%d_%H-%M-%S``), so that a new
    evaluation into ``out_dir`` does not overwrite them. Returns the moved paths' new locations."""
    out_dir = Path(out_dir)
    moved: list[Path] = []
    for name in names:
        paths = suite_files(out_dir, name)
        if not paths:
            continue
        ref = RunLayout(out_dir).suite(name)
        stamp = dt.datetime.fromtimestamp((ref if ref.exists() else paths[0]).stat().st_mtime)
        dest_root = out_dir / EARLIER_DIR / stamp.strftime("%Y-%m-%d_%H-%M-%S")
        for p in paths:
            dest = dest_root / p.relative_to(out_dir)
            n = 1
            while dest.exists():  # two evaluations within one second
                dest = dest.with_name(f"{p.stem}.{n}{p.suffix}")
                n += 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(dest))
            moved.append(dest)
    return moved
