"""Task registry, sources, templates, mixture sampling and collation.

The torch-free modules (:mod:`.selection`, :mod:`.batching`) import without torch or datasets; the names
below load :mod:`.build` (datasets, torch) on first use."""

from typing import Any

__all__ = ["MultiTaskData", "build_data", "selected_tasks"]


def __getattr__(name: str) -> Any:
    if name in ("MultiTaskData", "build_data"):
        from mtlora.data import build

        return getattr(build, name)
    if name == "selected_tasks":
        from mtlora.data.selection import selected_tasks

        return selected_tasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
