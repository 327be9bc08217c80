"""The rule checker every validation module shares: look a dotted key up in a composed config and record
one line per violation (``<key>=<value>: must be <allowed>``, or ``<key>: missing``), so that all of them
are reported together in one :class:`~mtlora.errors.ConfigError`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: what :meth:`Checker.get` returns for a key the config does not have (``None`` is a value)
MISSING = object()
EVERY = "an integer >= 1, 'auto' (every 10% of the steps) or null (never)"


def int_ok(lo: int | None = None, optional: bool = False) -> Callable[[Any], bool]:
    """An integer (not a bool) ``>= lo``; ``None`` passes when ``optional``."""

    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)

    return ok


def num_ok(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False, optional=False):
    """A number (not a bool) in the interval ``lo .. hi`` (each end open or closed); ``None`` passes when
    ``optional``."""

    def ok(v: Any) -> bool:
        if v is None:
            return optional
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return ok


def one_of(values) -> Callable[[Any], bool]:
    return lambda v: v in values


def describe_range(lo, hi, lo_open=False, hi_open=False, optional=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts) + (" (or null)" if optional else "")


class Checker:
    """The config under check and the error lines found so far."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.errors: list[str] = []

    def get(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, key, default=MISSING, throw_on_missing=False)

    def rule(self, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
        v = self.get(key)
        if v is MISSING:
            self.errors.append(f"{key}: missing (expected {allowed})")
        elif not ok(v):
            self.errors.append(f"{key}={v!r}: must be {allowed}")

    def int_(self, key: str, lo: int | None = None, optional: bool = False) -> None:
        self.rule(key, int_ok(lo, optional), "an integer " + describe_range(lo, None, optional=optional))

    def num(self, key: str, lo=None, hi=None, lo_open=False, hi_open=False, optional=False) -> None:
        self.rule(
            key,
            num_ok(lo, hi, lo_open, hi_open, optional),
            "a number " + describe_range(lo, hi, lo_open, hi_open, optional),
        )

    def choice(self, key: str, values) -> None:
        self.rule(key, one_of(values), f"one of {list(values)}")

    def bool_(self, key: str) -> None:
        self.rule(key, lambda v: isinstance(v, bool), "true or false")

    def has(self, key: str) -> bool:
        """Whether the config has ``key`` (optional keys are checked only when present)."""
        return self.get(key) is not MISSING


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a config node (list items as ``key[i]``); interpolations are
    resolved, and a leaf that cannot be resolved (e.g. ``${hydra:...}`` outside Hydra) is skipped."""
    if isinstance(node, DictConfig):
        for k in list(node):
            key = f"{prefix}.{k}" if prefix else str(k)
            try:
                v = node[k]
            except Exception:  # an interpolation that cannot resolve here
                continue
            yield from leaves(v, key)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            try:
                v = node[i]
            except Exception:
                continue
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def non_finite_numbers(cfg: DictConfig) -> list[str]:
    """One error per float leaf of ``cfg`` that is NaN or infinite (no key of the project accepts one: a
    NaN dropout is no dropout, a NaN weight an epoch of -2^65 examples)."""
    return [
        f"{key}={value!r}: must be a finite number"
        for key, value in leaves(cfg)
        if isinstance(value, float) and not math.isfinite(value)
    ]
