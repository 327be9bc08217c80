"""mtlora: a config-driven experiment runner for multi-task LoRA fine-tuning of LLMs."""

from __future__ import annotations

from typing import Any

from mtlora.errors import ConfigError, DataError
from mtlora.utils.version import __version__

__all__ = ["ConfigError", "DataError", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    # load_run pulls in torch and transformers: import it on first use so `import mtlora` stays instant
    if name == "load_run":
        from mtlora.trained_run import load_run

        return load_run
    raise AttributeError(f"module 'mtlora' has no attribute {name!r}")
