"""Import a stand-alone script of ``scripts/`` as a module, for tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.helpers.compose import REPO


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` executed as the module ``name`` (registered in ``sys.modules``, which
    dataclasses defined in the script need)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
