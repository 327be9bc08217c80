"""``adapter.method`` → :class:`~mtlora.adapters.spec.MethodSpec`, torch-free.

Every module of :mod:`mtlora.adapters.methods` describes one method family and registers its specs at
import (:func:`register`); :func:`discover` imports them all, so a new method is one spec module there plus
its layer module, and no list here changes. A spec registered from anywhere else (a plugin module, a test)
is found the same way once its module is imported. The layer classes load lazily
(:meth:`MethodSpec.layer_class`): importing this module, or validating a config, loads no torch.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator, Mapping

from mtlora.adapters.spec import MethodSpec
from mtlora.errors import ConfigError

_SPECS: dict[str, MethodSpec] = {}
_discovered = False


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add ``spec`` under ``spec.name``; a second spec of the same name is an error unless ``replace``."""
    old = _SPECS.get(spec.name)
    if old is not None and old is not spec and not replace:
        raise ValueError(f"adapter.method {spec.name!r} is registered twice ({old.layer} and {spec.layer})")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (plugins and tests that registered one for a while)."""
    _SPECS.pop(name, None)


@contextlib.contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """``spec`` registered inside the block only (plugins tried out, tests)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def discover() -> None:
    """Import every spec module of :mod:`mtlora.adapters.methods` once (each registers itself)."""
    global _discovered
    if _discovered:
        return
    from mtlora.adapters import methods

    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{info.name}")
    _discovered = True


def method_names() -> tuple[str, ...]:
    """Every registered ``adapter.method``, in registration order."""
    discover()
    return tuple(_SPECS)


def get_spec(name: str | None) -> MethodSpec | None:
    """The spec of ``adapter.method=name``, or None when no method has that name."""
    discover()
    return _SPECS.get(name) if isinstance(name, str) else None


def spec_of(name: str | None) -> MethodSpec:
    """The spec of ``adapter.method=name``; a :class:`ConfigError` listing the methods otherwise."""
    spec = get_spec(name)
    if spec is None:
        raise ConfigError(f"adapter.method={name!r}: allowed values are {sorted(method_names())}")
    return spec


def all_specs() -> tuple[MethodSpec, ...]:
    discover()
    return tuple(_SPECS.values())


class _LayerClasses(Mapping):
    """``adapter.method`` → layer class, read-only, resolved on access (imports the layer module)."""

    def __getitem__(self, name: str) -> type:
        spec = get_spec(name)
        if spec is None:
            raise KeyError(name)
        return spec.layer_class()

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())

    def __contains__(self, name: object) -> bool:
        return get_spec(name) is not None if isinstance(name, str) else False


#: ``adapter.method`` → layer class (a view of the registry; loads torch when a class is read)
ADAPTER_METHODS: Mapping[str, type] = _LayerClasses()
