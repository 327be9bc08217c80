"""The reference of a composed config: what the same group choices compose to without any ``key=value``
override. It gives the type of each key (a key whose presets hold ``true``/``false`` takes a boolean and
nothing else) and the set of known keys (a key added with ``+`` that no chosen preset defines is unknown,
and would be recorded and ignored).

The known keys are derived from the composed YAML presets, so a key added to a preset (``conf/adapter``,
``conf/alignment``, ``conf/eval``, ...) is known without any change here. Hydra's ``++KEY=VALUE`` (add or
override) adds a key on purpose and is not refused (e.g. a suite's settings for presets that may not run
that suite); ``+KEY=VALUE`` on a key no chosen preset defines is."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtlora.utils.resolvers import REPO_ROOT

#: groups whose keys the project defines: unknown keys there are refused
OWNED_GROUPS = ("adapter", "alignment", "eval", "train", "hardware", "model", "diagnostics", "logger", "data")
#: sub-trees passed on as keyword arguments (to ``AutoConfig``, the optimizer, the scheduler, a data source)
#: or keyed by the user (sampling weights per task), and optional keys no preset sets (``+data.packing``):
#: any key goes (the optimizer and scheduler are built once before the run dir is claimed, which checks them)
OPEN_KEYS = (
    "model.arch",
    "train.optimizer",
    "train.scheduler",
    "data.source.load_kwargs",
    "data.source.data_files",
    "data.tasks.*.source.load_kwargs",
    "data.tasks.*.source.data_files",
    "data.tasks.*.fields",
    "data.tasks.*.filter",
    "data.sampling.weights",
    "data.packing",
    "data.pack_tokens",
)
_MISSING = object()
CONF_DIR = REPO_ROOT / "conf"


@dataclass
class Reference:
    """The reference config and the keys the command line added on purpose (``++KEY=VALUE``)."""

    config: DictConfig
    forced: tuple[str, ...] = ()


def group_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose a config group option (``adapter=lora``, ``eval/bbh=align_lora``,
    ``+data/task@data.tasks.x=y``, ``~experiment``), not a key's value (``adapter.rank=4``)."""
    out = []
    for o in overrides:
        base = o.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        if "." not in base and not base.startswith("hydra") and (CONF_DIR / base.split("/")[0]).is_dir():
            out.append(o)
    return out


def hydra_reference() -> Reference | None:
    """The :class:`Reference` of the running Hydra job (its group overrides composed alone); None outside
    Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    task = [str(o) for o in hc.overrides.task]
    forced = tuple(o[2:].split("=", 1)[0] for o in task if o.startswith("++"))
    return Reference(reference_config(group_overrides(task), hc.job.config_name or "train"), forced)


def reference_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """``config_name`` composed with the group ``overrides`` only (no key overrides), unresolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _select(node: DictConfig, key: str) -> Any:
    return OmegaConf.select(
        node, key, default=_MISSING, throw_on_missing=False, throw_on_resolution_failure=False
    )


def _literal(node: DictConfig, key: str) -> Any:
    """The value of ``key`` as written in the presets (``_MISSING`` for an interpolation or no value)."""
    parent, _, leaf = key.rpartition(".")
    container = _select(node, parent) if parent else node
    if not isinstance(container, DictConfig) or leaf not in container:
        return _MISSING
    if OmegaConf.is_interpolation(container, leaf):
        return _MISSING
    return container[leaf]


def _keys(node: Any, prefix: str) -> list[str]:
    """Dotted keys of every dict entry under ``node`` (lists are values, not key sets)."""
    out = []
    if isinstance(node, DictConfig):
        for k in list(node):
            key = f"{prefix}.{k}" if prefix else str(k)
            out.append(key)
            try:
                child = node._get_node(k)
            except Exception:
                continue
            if isinstance(child, DictConfig):
                out += _keys(child, key)
    return out


def _open(key: str) -> bool:
    return any(fnmatchcase(key, k) or fnmatchcase(key, k + ".*") for k in OPEN_KEYS)


@cache
def task_keys() -> frozenset[str]:
    """The keys of a data task (``data.tasks.<name>.<key>``) that some task preset (``conf/data/task``)
    defines: known for every task (a JSON task may take a Flan template's keys)."""
    out: set[str] = set()
    for path in (CONF_DIR / "data" / "task").glob("*.yaml"):
        out.update(_keys(OmegaConf.load(path), ""))
    return frozenset(out)


def _task_key(key: str, reference: DictConfig) -> bool:
    """``data.tasks.<name>.<key>`` of a task the reference holds, or ``data.source.<key>`` (a source shared
    by the mixture's tasks), with a key of :func:`task_keys`."""
    parts = key.split(".", 3)
    if parts[:2] == ["data", "source"]:
        return _select(reference, "data.source") is not _MISSING and key[len("data.") :] in task_keys()
    return (
        len(parts) == 4
        and parts[:2] == ["data", "tasks"]
        and _select(reference, f"data.tasks.{parts[2]}") is not _MISSING
        and parts[3] in task_keys()
    )


def unknown_keys(cfg: DictConfig, reference: DictConfig, forced: tuple[str, ...] = ()) -> list[str]:
    """One error per key of an owned group (and of the root) that the reference does not define, unless
    it (or a key above it) is in ``forced``."""

    def is_forced(key: str) -> bool:  # added with ++, or a dict made to hold such a key
        return any(key == f or key.startswith(f + ".") or f.startswith(key + ".") for f in forced)

    errors, reported = [], []
    for k in list(cfg):
        if k not in reference and k != "hydra" and not is_forced(str(k)):
            errors.append(f"{k}: unknown top-level key (added with +?); known keys: {sorted(reference)}")
    for group in OWNED_GROUPS:
        if group not in cfg or group not in reference:
            continue
        for key in _keys(cfg._get_node(group), group):
            if _open(key) or is_forced(key) or _select(reference, key) is not _MISSING:
                continue
            if _task_key(key, reference):
                continue
            if any(key.startswith(r + ".") for r in reported):
                continue  # reported at its parent
            reported.append(key)
            parent = key.rpartition(".")[0]
            known = _select(reference, parent)
            names = sorted(str(x) for x in known) if isinstance(known, DictConfig) else []
            errors.append(
                f"{key}: unknown key (added with +?); the chosen presets define {parent} keys {names}; "
                "check the spelling, or add the key to the preset that uses it"
            )
    return errors


def type_errors(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """One error per key whose presets hold a boolean but whose value is not one (``use_rslora=flase``)."""
    errors = []
    for key in _keys(reference, ""):
        ref = _literal(reference, key)
        if not isinstance(ref, bool):
            continue
        value = _select(cfg, key)
        if value is _MISSING or value is None or isinstance(value, bool):
            continue
        errors.append(f"{key}={value!r}: must be true or false")
    return errors


def reference_errors(cfg: DictConfig, reference: Reference | None) -> list[str]:
    if reference is None:
        return []
    return unknown_keys(cfg, reference.config, reference.forced) + type_errors(cfg, reference.config)


__all__ = [
    "OPEN_KEYS",
    "OWNED_GROUPS",
    "Reference",
    "hydra_reference",
    "group_overrides",
    "reference_config",
    "reference_errors",
    "type_errors",
    "unknown_keys",
]
