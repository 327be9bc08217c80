"""Rules that tie several config groups together: what one group's choice requires of another (an
alignment loss needs two tasks and task-balanced micro-batches with enough rows behind each statistic,
MeTA-LoRA's meta step excludes an alignment loss and DeepSpeed, packing needs adapters and losses that
ignore row task ids, ZeRO-3 excludes compilation and the chunked loss)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mtlora.config.checker import Checker
from mtlora.data.batching import rows_per_task
from mtlora.data.selection import selected_tasks
from mtlora.errors import ConfigError


def check_meta(c: Checker, cfg: DictConfig) -> None:
    """MeTA-LoRA's meta-learning step (``adapter.meta``, adapter=meta_lora): its own keys, and no alignment."""
    if cfg.adapter.get("meta"):
        from mtlora.training.meta_lora import MetaLearner

        try:
            MetaLearner.from_config(cfg.adapter.meta)
        except ConfigError as e:
            c.errors.append(str(e))
        if cfg.alignment.get("name", "none") != "none":
            c.errors.append("adapter.meta: cannot be combined with an alignment loss; set alignment=none")


def check_alignment_tasks(c: Checker, cfg: DictConfig) -> None:
    """An alignment loss compares tasks: the data must select two or more."""
    try:
        n_align = len(selected_tasks(cfg.data))
    except ConfigError:
        n_align = None  # reported by the data rules
    if n_align is not None and n_align < 2:
        c.errors.append(
            f"alignment={cfg.alignment.get('name')}: aligns the representations of different tasks, but the "
            f"data has {n_align} task (data.select); its term would be 0: use alignment=none or two or "
            "more tasks"
        )


def packing_errors(cfg: DictConfig) -> list[str]:
    """Why ``data.packing=true`` cannot run ``cfg`` (empty: it can): the adapter method's own reason (its
    spec's ``packing_problem``), an alignment loss, a meta step (:func:`mtlora.data.packing.packing_conflicts`)."""
    from mtlora.adapters.registry import get_spec
    from mtlora.data.packing import packing_conflicts

    spec = get_spec(cfg.adapter.get("method"))
    return packing_conflicts(cfg, spec.packing_problem(cfg.adapter) if spec else None)


def check_packing(c: Checker, cfg: DictConfig) -> None:
    """``data.packing=true`` only with adapters and losses that ignore row task ids (:func:`packing_errors`)."""
    c.errors += packing_errors(cfg)


def check_compile_hardware(c: Checker, cfg: DictConfig, settings: Any) -> None:
    """Regional compilation (``train.compile``, parsed to ``settings``; None: off) is not run under ZeRO-3."""
    if settings is not None and (cfg.hardware.get("deepspeed") or {}).get("stage") == 3:
        c.errors.append("train.compile.enabled: not supported under ZeRO-3 (partitioned parameters)")


def check_deepspeed_combinations(c: Checker, cfg: DictConfig) -> None:
    """What ``hardware.deepspeed`` excludes: the meta step, and under ZeRO-3 the chunked loss."""
    ds = cfg.hardware.get("deepspeed")
    if not ds:
        return
    why = "not supported with hardware.deepspeed"
    if cfg.adapter.get("meta"):
        c.errors.append(f"adapter.meta: {why} (the meta step averages gradients itself)")
    if ds.get("stage") == 3 and (cfg.train.get("loss") or {}).get("impl", "full") != "full":
        c.errors.append("train.loss.impl: must be 'full' under ZeRO-3 (chunked CE reads the head weight)")


def check_task_balanced_batches(c: Checker, cfg: DictConfig) -> None:
    """The micro-batch holds the rows an alignment loss or the meta step needs
    (:func:`mtlora.data.batching.rows_per_task`), and enough rows stand behind each alignment statistic
    (:func:`mtlora.training.alignment_window.check_alignment_rows`)."""
    from mtlora.training.alignment_window import check_alignment_rows

    try:
        k = rows_per_task(cfg)
        check_alignment_rows(cfg, k, len(selected_tasks(cfg.data)))  # rows behind each statistic
    except ConfigError as e:
        c.errors.append(str(e))
