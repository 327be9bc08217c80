"""Rules of the run itself: the logger (``logger=``), the seed and ``resume``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from mtlora.config.checker import Checker
from mtlora.run.tracker import tracker_name

LOGGERS = ("none", "csv", "wandb", "wandb_offline", "tensorboard", "mlflow")


def check_run(c: Checker, cfg: DictConfig) -> None:
    c.choice("logger.name", LOGGERS)
    c.int_("seed", 0)
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).exists():
        c.errors.append(f"resume={resume!r}: must be null, 'auto', or an existing run/checkpoint dir")


def check_tracker(cfg: DictConfig) -> None:
    """Raise :class:`~mtlora.errors.ConfigError` when the tracker package of ``logger=`` (tensorboard, mlflow,
    wandb) is not installed."""
    tracker_name(cfg.logger)
