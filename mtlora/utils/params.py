"""Parameter sizes that hold under DeepSpeed ZeRO-3 too (imports no torch)."""

from __future__ import annotations

from typing import Any


def param_numel(p: Any) -> int:
    """The full size of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (``p.numel()`` is then 0
    and ``p.ds_numel`` the whole tensor's size)."""
    return int(getattr(p, "ds_numel", p.numel()))
