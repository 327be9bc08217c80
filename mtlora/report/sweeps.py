"""Sweep presets (``conf/hparams_search/``): every swept key must act on the composed config.

A sweep preset sweeps over what the user selected (``experiment=`` / ``adapter=``); it does not replace the
adapter. Without an ``experiment=`` it selects a default experiment (``conf/experiment/sweeps/<name>.yaml``,
e.g. HydraLoRA for ``head_sweep``), which an ``experiment=`` on the command line replaces. What it sweeps
must then exist and be live: ``adapter.num_heads`` needs a multi-head adapter, ``alignment.*`` an alignment
loss (``alignment=none`` keeps its knobs, unused). :class:`SweptKeysCheck` (registered by the presets under
``hydra.callbacks``) checks that once, in the sweep process before any job starts, and otherwise stops the
multirun (exit status 1) with a :class:`~mtlora.errors.ConfigError` message naming the key, instead of a
sweep whose results carry the preset's ``report.cell`` but trained something else.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError

_ABSENT = object()

#: hints for swept keys the composed config lacks
MISSING_HINTS = {
    "adapter.num_heads": "a multi-head adapter (adapter=hydralora|rlora|mlora|mtlora) or an experiment preset "
    "with one (e.g. experiment=rlora/t4/rlora)",
}
ALIGNMENT_HINT = (
    "an adapter with an alignment loss (adapter=align_kl|align_mmd) or an Align-LoRA experiment preset "
    "(e.g. experiment=align_lora/t4/a_lora_k)"
)


def _choice(cfg: DictConfig, group: str) -> str | None:
    return OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)


def _selected(cfg: DictConfig) -> str:
    """``adapter=X, experiment=Y`` (the selection the swept keys act on), for messages."""
    adapter = _choice(cfg, "adapter") or OmegaConf.select(cfg, "adapter.name", default="?")
    experiment = _choice(cfg, "experiment")
    return f"adapter={adapter}" + (f", experiment={experiment}" if experiment else "")


def check_swept_keys(cfg: DictConfig, keys: Any = None) -> None:
    """Raise a ConfigError naming the first key of ``keys`` (default: ``hydra.sweeper.params``) that is
    absent from ``cfg`` or dead in it (``alignment.*`` with ``alignment=none``)."""
    if keys is None:
        keys = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    preset = _choice(cfg, "hparams_search")
    who = f"hparams_search={preset}" if preset else "the sweep"
    for key in keys:
        key = str(key).lstrip("+~")
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            hint = MISSING_HINTS.get(key, f"a config that has {key}")
            raise ConfigError(
                f"{who} sweeps {key}, but the composed config has no {key} ({_selected(cfg)}); select {hint}"
            )
        if key.startswith("alignment.") and OmegaConf.select(cfg, "alignment.name") == "none":
            raise ConfigError(
                f"{who} sweeps {key}, but alignment=none ({_selected(cfg)}): the value would have no effect; "
                f"select {ALIGNMENT_HINT}"
            )


class SweptKeysCheck(Callback):
    """:func:`check_swept_keys` on the multirun's composed config, before the sweeper starts any job. Hydra
    turns a callback's exception into a warning and goes on, so a failed check exits instead: one line,
    status 2, as every user error (:mod:`mtlora.cli.entry`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mtlora.cli.entry import EXIT_USER_ERROR, full_error, report
        from mtlora.cli.errors import flatten

        try:
            check_swept_keys(config)
        except ConfigError as e:
            if full_error():
                raise
            report(flatten(str(e)))
            raise SystemExit(EXIT_USER_ERROR) from None
