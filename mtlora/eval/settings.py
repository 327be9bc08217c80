"""Settings shared by the evaluation suites: a suite's config block over its defaults, and the task id that
task-aware adapters get for prompts of tasks they were not trained on (BBH, MMLU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_settings(cfg: DictConfig | dict | None, defaults: dict, where: str) -> dict:
    """``cfg`` over ``defaults``; unknown keys are a ConfigError naming ``where``."""
    given = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **given}


def resolve_task_id(
    model: torch.nn.Module, task_id, task_names: Sequence[str] | None, where: str = "eval.bbh"
) -> int | None:
    """The task id given to a task-aware adapter for every prompt of an unseen-task suite (``<where>.task_id``):
    None for adapters without task ids; else an int in ``[0, len(task_names))`` or a training task's name;
    null is an error (a ConfigError naming ``<where>.task_id`` and the training tasks)."""
    from mtlora.eval.generate import needs_task_ids

    if not needs_task_ids(model):
        return None
    key = f"{where}.task_id"
    if task_id is None:
        raise ConfigError(
            f"{key}=null: the adapter is task-aware and BBH tasks were not trained on; set "
            f"{key} to a training task id or name (training tasks: {list(task_names or [])})"
        )
    if isinstance(task_id, bool):
        raise ConfigError(f"{key}={task_id!r}: must be an int or a training task name")
    if isinstance(task_id, str):
        if not task_names or task_id not in task_names:
            raise ConfigError(f"{key}={task_id!r}: not a training task; choose from {list(task_names or [])}")
        return list(task_names).index(task_id)
    n = len(task_names) if task_names else None
    if not isinstance(task_id, int) or task_id < 0 or (n is not None and task_id >= n):
        raise ConfigError(f"{key}={task_id!r}: must be a task id in [0, {n}) or a training task name")
    return task_id
