"""Rules of the ``data`` group: the tasks, ``data.select``, the mixture (``data.sampling``), the budget,
the sources of each task and ``data.packing``."""

from __future__ import annotations

from omegaconf import DictConfig

from mtlora.config.checker import MISSING, Checker, num_ok
from mtlora.config.cross_rules import check_packing
from mtlora.data.mixture import STRATEGIES


def check_data(c: Checker, cfg: DictConfig) -> None:
    from mtlora.data.sources import SOURCE_TYPES  # imports datasets (the readers)

    tasks = cfg.data.get("tasks") or {}
    if not tasks:
        c.errors.append(f"data.tasks: data={cfg.data.get('name')} defines no task")
    select = cfg.data.get("select")
    if select:
        unknown = [t for t in select if t not in tasks]
        if unknown:
            c.errors.append(f"data.select: unknown task(s) {unknown}; allowed: {list(tasks)}")
    c.choice("data.sampling.strategy", STRATEGIES)
    if cfg.data.get("sampling", {}).get("strategy") == "weights":
        weights = cfg.data.sampling.get("weights") or {}
        used = list(select) if select else list(tasks)
        missing, unknown = [t for t in used if t not in weights], [t for t in weights if t not in used]
        if missing or unknown:
            c.errors.append(
                f"data.sampling.weights: needs one weight per task {used}; missing {missing}, "
                f"unknown {unknown}"
            )
        for t in weights:
            c.num(f"data.sampling.weights.{t}", 0)
        valid = not missing and not unknown and all(num_ok(0)(weights[t]) for t in used)
        if valid and not sum(weights[t] for t in used) > 0:
            c.errors.append("data.sampling.weights: must have a positive sum")
    c.num("data.sampling.temperature", 0, lo_open=True)
    c.int_("data.budget", 1, optional=True)
    c.choice("data.on_bad_row", ("error", "skip"))
    for name in tasks:
        c.choice(f"data.tasks.{name}.source.type", SOURCE_TYPES)
        c.num(f"data.tasks.{name}.eval.fraction", 0, 1, hi_open=True)
        c.int_(f"data.tasks.{name}.max_train_examples", 1, optional=True)


def check_packing_keys(c: Checker, cfg: DictConfig) -> None:
    """``data.packing`` (optional key, mtlora.data.packing) and what it excludes."""
    if c.get("data.packing") not in (MISSING, None):
        c.bool_("data.packing")
        check_packing(c, cfg)
