"""Rules of the ``train`` group: steps and batch sizes, the optimizer and scheduler
(``train.optimizer`` / ``train.scheduler``), regional compilation (``train.compile``) and the memory-lean
loss (``train.loss``)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from mtlora.config.checker import EVERY, Checker, num_ok
from mtlora.config.cross_rules import check_compile_hardware
from mtlora.errors import ConfigError
from mtlora.run.schedule import valid_every


def check_train(c: Checker, cfg: DictConfig) -> None:
    c.int_("train.max_steps", 1, optional=True)
    c.int_("train.epochs", 1)
    c.int_("train.micro_batch_size", 1)
    c.int_("train.gradient_accumulation_steps", 1)
    c.num("train.max_grad_norm", 0, optional=True)
    c.choice("train.precision", ("fp32", "bf16"))
    c.num("train.warmup_ratio", 0, 1)
    c.int_("train.log_every", 1)
    c.rule("train.checkpoint_every", valid_every, EVERY)
    c.int_("train.keep_checkpoints", 1)
    c.num("train.optimizer.lr", 0, lo_open=True)
    check_optimization(c)
    c.num("train.loss_watchdog.factor", 1, lo_open=True)
    c.int_("train.loss_watchdog.patience", 1)
    if c.has("train.compile"):  # regional compilation (mtlora.training.compile)
        from mtlora.training.compile import compile_settings

        try:
            settings = compile_settings(cfg.train.compile)
        except ConfigError as e:
            c.errors.append(str(e))
        else:
            check_compile_hardware(c, cfg, settings)
    if c.has("train.loss"):  # memory-lean loss (mtlora.losses.causal_lm)
        from mtlora.losses.causal_lm import LOSS_IMPLS

        c.choice("train.loss.impl", LOSS_IMPLS)
        c.int_("train.loss.chunk_tokens", 1)


def check_optimization(c: Checker) -> None:
    """The usual optimizer keys (when present) and the scheduler name of ``transformers.get_scheduler``;
    :func:`build_optimization` then builds both once, which checks every other keyword."""
    if c.has("train.optimizer.weight_decay"):
        c.num("train.optimizer.weight_decay", 0)
    if c.has("train.optimizer.eps"):
        c.num("train.optimizer.eps", 0, lo_open=True)
    if c.has("train.optimizer.betas"):
        c.rule(
            "train.optimizer.betas",
            lambda v: (
                isinstance(v, ListConfig) and len(v) == 2 and all(num_ok(0, 1, hi_open=True)(b) for b in v)
            ),
            "two numbers in [0, 1) (e.g. [0.9, 0.999])",
        )
    if str(c.get("train.scheduler._target_")) == "transformers.get_scheduler":
        from transformers import SchedulerType

        c.choice("train.scheduler.name", tuple(t.value for t in SchedulerType))


def build_optimization(cfg: DictConfig) -> None:
    """Build ``train.optimizer`` and ``train.scheduler`` once on a one-element parameter, so that a value the
    rules above do not cover (a keyword of another optimizer class, a scheduler argument) fails before the
    run dir is claimed, as a :class:`ConfigError` naming the group."""
    import torch
    from hydra.utils import instantiate

    p = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = instantiate(cfg.train.optimizer)(params=[p])
    except Exception as e:
        raise ConfigError(
            f"train.optimizer ({cfg.train.optimizer.get('_target_')}): {type(e).__name__}: {e}"
        ) from e
    try:
        instantiate(cfg.train.scheduler)(optimizer=opt, num_warmup_steps=1, num_training_steps=10)
    except Exception as e:
        raise ConfigError(
            f"train.scheduler ({cfg.train.scheduler.get('_target_')}): {type(e).__name__}: {e}"
        ) from e
