"""Local metric files, always written whatever ``logger=`` says: JSONL per step, CSV per task; log lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class JsonlLog:
    """Append-only ``metrics/<name>.jsonl``; :meth:`truncate_after` drops records past a resumed step."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = run_dir / "metrics" / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts) as CSV with the union of their keys as columns, in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def train_line(rec: dict[str, Any], total_steps: int) -> str:
    """One ``train.log`` line of a ``metrics/train.jsonl`` record: step, loss, lr, tokens/s, per-task loss."""
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.3e}",
        f"{rec['tokens_per_s']:,.0f} tok/s",
    ]
    if rec.get("align_loss") is not None:
        parts.append(f"align {rec['align_loss']:.4f}")
    if rec.get("task_loss"):
        parts.append("task loss " + ", ".join(f"{t} {v:.4f}" for t, v in rec["task_loss"].items()))
    return " | ".join(parts)


def heldin_line(result: dict[str, Any]) -> str:
    """One line of a ``heldin`` evaluation: macro loss / token accuracy / exact match, then loss per task."""
    m = result["macro"]
    tasks = ", ".join(f"{t} {r['loss']:.4f}" for t, r in result["tasks"].items())
    return (
        f"macro loss {m['loss']:.4f}, token_acc {m['token_acc']:.4f}, exact_match {m['exact_match']:.4f} | "
        f"task loss {tasks}"
    )


def train_csv_rows(train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics/train.jsonl`` records as ``train.csv`` rows: the per-task losses as ``task_loss/<task>``."""
    return [
        {
            **{k: v for k, v in r.items() if k != "task_loss"},
            **{f"task_loss/{t}": v for t, v in (r.get("task_loss") or {}).items()},
        }
        for r in train
    ]
