"""Validation of a composed config (:func:`validate_config`), one module per group of rules."""

from typing import Any

__all__ = ["validate_config"]


def __getattr__(name: str) -> Any:
    # loaded on first use, so that the rule modules import without the adapter classes
    if name == "validate_config":
        from mtlora.config.validate import validate_config

        return validate_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
