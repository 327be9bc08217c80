"""The weight dtypes ``model.dtype`` names (torch-free: validation checks the name before torch loads)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtlora.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: ``model.dtype`` values, each the name of a ``torch`` dtype
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch`` dtype of ``model.dtype``; a :class:`ConfigError` naming the allowed values otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r}: allowed values are {sorted(DTYPES)}")
    import torch

    return getattr(torch, name)
