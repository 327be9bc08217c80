"""Local metric files, always written whatever ``logger=`` says: JSONL per step, CSV per task; log lines."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from mtlora.errors import DataError
from mtlora.utils.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, one JSON object per line (blank lines skipped).

    A last line that does not parse and has no newline is a record torn by a kill or a full disk: it is
    dropped with a warning. Any other line that does not parse raises :class:`DataError` naming the file
    and the line number."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut off
                log.warning(
                    "%s: line %d is an incomplete record (cut off by a kill or a full disk); ignoring it",
                    path,
                    i + 1,
                )
                continue
            raise DataError(f"{path}: line {i + 1} is not a JSON record ({e.msg}): {line[:120]!r}") from e
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i + 1} is not a JSON object: {line[:120]!r}")
        records.append(rec)
    return records


class JsonlLog:
    """Append-only ``metrics/<name>.jsonl``; :meth:`truncate_after` drops records past a resumed step.

    An append first drops a torn last record, and :meth:`truncate_after` rewrites the file
    atomically (temporary file + rename), so a full disk or a kill leaves either the old or the new file."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = run_dir / "metrics" / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("r+b" if self.path.exists() else "w+b") as f:
            end = f.seek(0, 2)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a torn last record (kill, full disk): drop it before appending
                    f.seek(0)
                    cut = f.read().rfind(b"\n") + 1
                    log.warning("%s: dropping an incomplete last record (bytes %d-%d)", self.path, cut, end)
                    f.truncate(cut)
                    end = f.seek(cut)
            f.write((json.dumps(record) + "\n").encode())

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (dicts) as CSV with the union of their keys as columns, in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


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
