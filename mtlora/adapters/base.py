"""The base class every adapter layer derives from.

An adapter layer wraps a frozen ``nn.Linear`` (``base_layer``) and adds a trainable update:
``h = W0 x + Δ(x)``. Subclasses implement :meth:`delta`; mergeable ones also implement
:meth:`delta_weight` so that ``W = W0 + ΔW`` can be folded into the base weight and taken out again.
Task-aware layers (:class:`mtlora.adapters.mtl_lora.TaskAwareLayer`) merge one task's
``W = W0 + ΔW_t`` instead (``merge(task_id)``, :attr:`per_task_mergeable`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.errors import ConfigError


def check_arg(name: str, key: str, value, ok: bool, allowed: str) -> None:
    """Raise a :class:`ConfigError` naming ``adapter.<key>``, the layer and what is allowed unless ``ok``."""
    if not ok:
        raise ConfigError(f"adapter.{key}={value!r} ({name}): must be {allowed}")


def is_int(v, lo: int) -> bool:
    """``v`` is an int (not a bool) and at least ``lo``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


class AdapterLayer(nn.Module):
    #: whether the update can be folded into the base weight (no routing on the token input)
    mergeable: ClassVar[bool] = False
    #: whether ``merge(task_id)`` folds one task's update ``ΔW_t`` into the base weight (task-aware layers)
    per_task_mergeable: ClassVar[bool] = False
    #: whether the layer needs ``context.task_ids`` in every forward
    needs_task_ids: ClassVar[bool] = False
    #: optional knobs read from ``adapter.<key>`` by :meth:`from_config` (a missing key gives None, and the
    #: constructor then uses the value here, the class's documented default)
    defaults: ClassVar[dict] = {}
    #: constructor arguments that ``adapter.<key>`` must provide besides rank, alpha, dropout, use_rslora
    required_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Linear, name: str, context: AdapterContext) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: adapters wrap nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapter_name = name
        # a plain attribute, not a submodule: the context is shared by all layers and holds no weights
        object.__setattr__(self, "context", context)
        self.merged = False
        self.enabled = True

    @classmethod
    def config_knobs(cls) -> tuple[str, ...]:
        """The optional knobs :meth:`from_config` reads (all of :attr:`defaults`)."""
        return tuple(cls.defaults)

    @classmethod
    def from_config(cls, base_layer: nn.Linear, name: str, context: AdapterContext, cfg):
        """Build the layer from the ``adapter`` config: rank, alpha, dropout, use_rslora, the
        :attr:`required_keys` and the optional :meth:`config_knobs`."""
        return cls(
            base_layer,
            name,
            context,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            use_rslora=cfg.use_rslora,
            **{k: cfg[k] for k in cls.required_keys},
            **{k: cfg.get(k) for k in cls.config_knobs()},
        )

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive update Δ(x), same shape as ``base_layer(x)``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW such that Δ(x) = x ΔWᵀ at eval time (mergeable adapters only)."""
        raise TypeError(f"{type(self).__name__} routes on the token input and cannot be merged")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        return out + self.delta(x).to(out.dtype)

    def capture(self, key: str, value: torch.Tensor) -> None:
        """Hand a representation (e.g. the down-projection output) to the context when capture is on."""
        if self.context.capture:
            self.context.captured[f"{self.adapter_name}.{key}"] = value

    def add_aux_loss(self, key: str, value: torch.Tensor) -> None:
        self.context.aux_losses[f"{self.adapter_name}.{key}"] = value

    @torch.no_grad()
    def _fold(self, delta: torch.Tensor, sign: float) -> None:
        """``W0 ± ΔW`` in place, ``ΔW`` cast to the base weight's device and dtype."""
        w = self.base_layer.weight
        w.add_(delta.to(device=w.device, dtype=w.dtype), alpha=sign)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._fold(self.delta_weight(), 1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._fold(self.delta_weight(), -1.0)
        self.merged = False
