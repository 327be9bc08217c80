"""Load one task: read rows, map fields, filter, check rows, split off held-out rows, render prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
from omegaconf import DictConfig

from mtlora.data.sources import load_parts
from mtlora.data.templates import Template
from mtlora.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class TaskSplits:
    """A task's rendered examples: ``train`` and ``eval`` have columns ``prompt`` and ``target``."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset
    skipped_rows: int = 0


def _rename(ds: datasets.Dataset, fields: DictConfig | None) -> datasets.Dataset:
    # fields maps template name -> source column (e.g. {answer: response})
    for new, old in (fields or {}).items():
        if old != new:
            if old not in ds.column_names:
                continue  # reported per row by _render as a missing field
            if new in ds.column_names:  # the mapping wins over a source column of the same name
                ds = ds.remove_columns(new)
            ds = ds.add_column(new, list(ds[old]))
    return ds


def _render(parts, template: Template, where: str, on_bad_row: str) -> tuple[list[dict], int]:
    """Render every row; a row missing a template field is an error naming file and row, or skipped.

    ``parts`` holds ``(origin, dataset, rows, n_origin)`` (from ``_filter``): ``rows[j]`` is the row number
    in ``origin`` of the dataset's row ``j`` and ``n_origin`` the rows ``origin`` holds. Errors name the row
    of the file, and a row's template depends only on its place in the source, not on filtering or on
    skipped rows.
    """
    out: list[dict] = []
    skipped = 0
    offset = 0
    for origin, ds, rows, n_origin in parts:
        for row, i in zip(ds, rows):
            bad = [f for f in template.required_fields if row.get(f) is None or str(row.get(f)).strip() == ""]
            if bad:
                if on_bad_row == "skip":
                    skipped += 1
                    continue
                raise DataError(
                    f"{where}: row {i} of {origin} has missing or empty field(s) {bad} "
                    f"(set data.on_bad_row=skip to skip such rows)"
                )
            prompt, target = template.render(row, offset + i)
            out.append({"prompt": prompt, "target": target})
        offset += n_origin
    return out, skipped


def _filter(parts, flt: DictConfig | None):
    """``(origin, ds)`` -> ``(origin, kept rows, their row numbers in origin, rows in origin)``."""
    if not flt:
        return [(o, ds, range(len(ds)), len(ds)) for o, ds in parts]
    items = dict(flt)
    out = []
    for o, ds in parts:
        cols = [ds[k] if k in ds.column_names else [None] * len(ds) for k in items]
        keep = [i for i, vals in enumerate(zip(*cols)) if all(a == b for a, b in zip(vals, items.values()))]
        out.append((o, ds.select(keep), keep, len(ds)))
    return out


def _cap(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    ds = datasets.Dataset.from_list(rows).shuffle(seed=seed).select(range(n))
    return ds.to_list()


def load_task(name: str, cfg: DictConfig, seed: int, on_bad_row: str = "error") -> TaskSplits:
    """Load task ``name`` (config ``data.tasks.<name>``) into rendered train/eval splits."""
    where = f"data.tasks.{name}"
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row={on_bad_row!r}: allowed values are ['error', 'skip']")
    template = Template.from_config(cfg.template, seed=seed, where=f"{where}.template")
    src = cfg.source

    def prepare(split: str):
        unreadable: list[int] = []  # lines of the source files that could not be read (on_bad_row=skip)
        parts = load_parts(src, where, seed, split, on_bad_row, unreadable)
        parts = [(o, _rename(ds, cfg.get("fields"))) for o, ds in parts]
        rows, bad = _render(_filter(parts, cfg.get("filter")), template, where, on_bad_row)
        return rows, bad + sum(unreadable)

    rows, skipped = prepare(cfg.get("split", "train"))
    ev = cfg.eval
    if ev.get("split"):
        eval_rows, s2 = prepare(ev.split)
        skipped += s2
        train_rows = rows
    else:
        n_eval = max(1, int(round(len(rows) * float(ev.fraction)))) if rows else 0
        shuffled = datasets.Dataset.from_list(rows).shuffle(seed=seed) if rows else None
        eval_rows = shuffled.select(range(n_eval)).to_list() if rows else []
        train_rows = shuffled.select(range(n_eval, len(rows))).to_list() if rows else []
    train_rows = _cap(train_rows, cfg.get("max_train_examples"), seed)
    eval_rows = _cap(eval_rows, ev.get("max_examples"), seed)
    if not train_rows:
        raise DataError(f"{where}: no training rows left after filtering/splitting (source {src.type})")
    if skipped:
        log.warning("%s: skipped %d malformed rows (data.on_bad_row=skip)", where, skipped)
    cols = {"prompt": [], "target": []}
    return TaskSplits(
        name=name,
        train=datasets.Dataset.from_list(train_rows) if train_rows else datasets.Dataset.from_dict(cols),
        eval=datasets.Dataset.from_list(eval_rows) if eval_rows else datasets.Dataset.from_dict(cols),
        skipped_rows=skipped,
    )
