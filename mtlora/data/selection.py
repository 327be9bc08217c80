"""The tasks a data config selects (torch-free: validation and counting use it before anything is built)."""

from __future__ import annotations

from omegaconf import DictConfig

from mtlora.errors import ConfigError


def selected_tasks(data_cfg: DictConfig) -> list[str]:
    """Task names of the mixture in task-id order (``data.select`` restricts and orders them)."""
    available = list(data_cfg.tasks or {})
    select = data_cfg.get("select")
    if not select:
        return available
    unknown = [t for t in select if t not in available]
    if unknown:
        raise ConfigError(
            f"data.select names unknown task(s) {unknown}; tasks of data={data_cfg.name}: {available}"
        )
    repeated = sorted({t for t in select if list(select).count(t) > 1})
    if repeated:
        raise ConfigError(f"data.select names task(s) {repeated} more than once; each task gets one task id")
    return list(select)
