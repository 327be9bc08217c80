"""The files every evaluation suite writes: metrics tables and per-example predictions."""

from __future__ import annotations

import json
from pathlib import Path

from mtlora.run.metrics import markdown_table, write_csv
from mtlora.utils.io import atomic_write_text


def write_suite_outputs(
    name: str, result: dict, cols: list[str], note: str, preds: dict[str, list[dict]], out_dir: Path
) -> None:
    """``metrics/eval_<name>.{json,csv,md}`` (per-task rows, then ``macro`` and ``micro``) and
    ``predictions/<name>/<task>.jsonl``."""
    out_dir = Path(out_dir)
    mdir = out_dir / "metrics"
    mdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mdir / f"eval_{name}.json", json.dumps(result, indent=2))
    rows = [{"task": t, **m} for t, m in result["tasks"].items()]
    for agg in ("macro", "micro"):  # n = all rows, as in the BBH tables
        rows.append(
            {"task": agg, **{k: v for k, v in result[agg].items() if k != "n"}, "n": result["micro"]["n"]}
        )
    rows += [{"task": g, **m} for g, m in result.get("groups", {}).items()]  # e.g. MMLU categories
    table = [{c: r.get(c, "") for c in cols} for r in rows]
    write_csv(mdir / f"eval_{name}.csv", table)
    atomic_write_text(mdir / f"eval_{name}.md", note + "\n\n" + markdown_table(table, cols) + "\n")
    pdir = out_dir / "predictions" / name
    pdir.mkdir(parents=True, exist_ok=True)
    for task, lines in preds.items():
        atomic_write_text(pdir / f"{task}.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
