"""The registry of procedures: what a run does with its config.

A procedure is registered under a name with the dotted path of its factory (``"module:attr"``), imported
only when the procedure is used, so that this module loads no torch. The factory is called as
``factory(cfg, run_dir)`` and returns an object whose ``run()`` does the whole run (markers and the
resolved config stay with the caller) and returns its final held-in result (``{}`` when none).

:func:`procedure_for` asks each procedure whether it ``handles(cfg)``: a procedure that names the
``adapter.method`` values it handles takes those; the default procedure (gradient fine-tuning) takes the
rest.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

#: the procedure of every config that no other procedure handles
DEFAULT = "finetune"


class Procedure(Protocol):
    """What a factory returns: one run of ``cfg`` into ``run_dir``."""

    def run(self) -> dict: ...


def _load(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ProcedureSpec:
    """A registered procedure.

    ``factory``: ``"module:attr"`` of ``(cfg, run_dir) -> Procedure``; ``methods``: the ``adapter.method``
    values it handles (empty: the default procedure only); ``preflight``: ``"module:attr"`` of a check of
    ``cfg`` that loads no weights (run before the run dir is claimed); ``workers``: whether it runs in the
    ``accelerate launch`` workers under ``hardware.launcher=accelerate`` (else in this process)."""

    name: str
    factory: str
    methods: tuple[str, ...] = ()
    preflight: str | None = None
    workers: bool = False

    def handles(self, cfg: DictConfig) -> bool:
        return cfg.adapter.get("method") in self.methods

    def check(self, cfg: DictConfig) -> None:
        """The procedure's own preflight checks (none when it has none)."""
        if self.preflight is not None:
            _load(self.preflight)(cfg)

    def create(self, cfg: DictConfig, run_dir: Path) -> Procedure:
        return _load(self.factory)(cfg, run_dir)

    def run(self, cfg: DictConfig, run_dir: Path) -> dict:
        """Run ``cfg`` into ``run_dir`` with this procedure."""
        return self.create(cfg, run_dir).run()


PROCEDURES: dict[str, ProcedureSpec] = {}


def register(spec: ProcedureSpec) -> ProcedureSpec:
    if spec.name in PROCEDURES:
        raise ValueError(f"procedure {spec.name!r} is registered twice")
    PROCEDURES[spec.name] = spec
    return spec


def get_procedure(name: str) -> ProcedureSpec:
    try:
        return PROCEDURES[name]
    except KeyError:
        raise KeyError(f"unknown procedure {name!r}: registered are {sorted(PROCEDURES)}") from None


def procedure_for(cfg: DictConfig) -> ProcedureSpec:
    """The procedure that runs ``cfg``: the one that handles its ``adapter.method``, else :data:`DEFAULT`."""
    for spec in PROCEDURES.values():
        if spec.name != DEFAULT and spec.handles(cfg):
            return spec
    return PROCEDURES[DEFAULT]


register(
    ProcedureSpec(
        name=DEFAULT,
        factory="mtlora.procedures.finetune.recipe:FinetuneRecipe",
        workers=True,
    )
)
register(
    ProcedureSpec(
        name="lorahub",
        factory="mtlora.procedures.lorahub.procedure:LoraHubProcedure",
        methods=("lorahub",),
        preflight="mtlora.procedures.lorahub.library:preflight_lorahub",
    )
)
