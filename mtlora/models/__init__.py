"""The base model and tokenizer of a ``model=`` preset. The names below load :mod:`.factory` (torch,
transformers) on first use; :mod:`.dtypes` imports without them."""

from typing import Any

__all__ = ["build_model", "build_tokenizer", "count_parameters", "meta_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mtlora.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
