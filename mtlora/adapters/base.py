"""The base class every adapter layer derives from.

An adapter layer wraps a frozen ``nn.Linear`` (``base_layer``) and adds a trainable update:
``h = W0 x + Δ(x)``. Subclasses implement :meth:`delta`; mergeable ones also implement
:meth:`delta_weight` so that ``W = W0 + ΔW`` can be folded into the base weight and taken out again.
Task-aware layers (:class:`mtlora.adapters.task_aware.TaskAwareLayer`) merge one task's
``W = W0 + ΔW_t`` instead (``merge(task_id)``, :attr:`per_task_mergeable`).

A layer class names its method's :class:`~mtlora.adapters.spec.MethodSpec` (:attr:`spec`): the spec gives
the knobs :meth:`from_config` reads, their defaults and checks (:meth:`resolve_knobs`), and whether the
layer routes tokens (:attr:`token_routed`). Diagnostics read a layer through :meth:`router_weights` and
:meth:`up_heads`, never through attribute names of one method.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.adapters.spec import MethodSpec
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
    #: the method whose knobs the constructor reads (defaults, checks; see the module doc)
    spec: ClassVar[MethodSpec | None] = None

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
        """The knobs of :attr:`spec` that :meth:`from_config` hands to the constructor: the top-level keys the
        constructor takes (a missing key gives None, which the constructor replaces by the spec's default;
        a knob used elsewhere, e.g. by a ``place_adapters`` seam, is not passed)."""
        if cls.spec is None:
            return ()
        params = inspect.signature(cls.__init__).parameters
        return tuple(k.name for k in cls.spec.knobs if k.name in params)

    @classmethod
    def from_config(cls, base_layer: nn.Linear, name: str, context: AdapterContext, cfg):
        """Build the layer from the ``adapter`` config: rank, alpha, dropout, use_rslora and the spec's
        :meth:`config_knobs`."""
        return cls(
            base_layer,
            name,
            context,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            use_rslora=cfg.use_rslora,
            **{k: cfg.get(k) for k in cls.config_knobs()},
        )

    @classmethod
    def resolve_knobs(cls, name: str, **given) -> dict:
        """``given`` knob values (None = not given) with the spec's defaults filled in, checked against the
        spec (``rank`` too); raises a :class:`ConfigError` naming ``adapter.<key>`` and the layer."""
        check_arg(name, "rank", given.get("rank"), is_int(given.get("rank"), 1), "an integer >= 1")
        return cls.spec.resolve(name, given) if cls.spec else dict(given)

    @property
    def token_routed(self) -> bool:
        """Whether the update weights heads / experts by a router on each token's input."""
        return bool(self.spec and self.spec.token_routed)

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token routing weights of the input ``x``: ``(..., N)``, or ``(..., G, N)`` per routing group,
        fp32 (token-routed layers only; the dense probabilities, before any top-k)."""
        raise TypeError(f"{type(self).__name__} has no token router")

    def up_heads(self) -> torch.Tensor | None:
        """The up-projection heads / experts ``B_i`` as ``(N, d_out, r)`` (a view), or None for one."""
        return None

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


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of ``model`` by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
