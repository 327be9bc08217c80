"""Typed, torch-free description of an adapter method: its knobs and what it can do.

A :class:`MethodSpec` is the one source of a method's optional knobs (default, allowed values, one line of
doc), of the checks its layer constructor runs on them and of the config validation of ``adapter.<knob>``
(:func:`mtlora.config.validate.validate_config` reads the spec of the chosen ``adapter.method`` only, so a
key of the same name in another method gets that method's rule). Its capabilities (token routing, task
ids, packing, peft export form, rank rule of equal-budget comparisons, router parameters) are attributes,
so no caller tests a method by its name.

A method lives in one spec module of :mod:`mtlora.adapters.methods` (registered with
:func:`mtlora.adapters.registry.register` at import) plus its layer module, which the spec names as
``"package.module:Class"`` and which is imported only when a layer is built (:meth:`MethodSpec.layer_class`).
Neither this module nor the spec modules import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mtlora.errors import ConfigError

#: a knob or cross-key rule's own check: the allowed values as text when ``value`` is wrong, else None
Check = Callable[[Any, Mapping[str, Any]], "str | None"]
#: a rule over all the method's knob values: an error line (``adapter.<key>=...: must be ...``) or None
Rule = Callable[[Mapping[str, Any]], "str | None"]

KINDS = ("int", "num", "bool", "choice", "any")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Knob:
    """One ``adapter.<name>`` key of a method: its default, what is allowed, and a one-line doc.

    ``kind``: ``int`` / ``num`` (a number ``>= lo``, or ``> lo`` with ``lo_open``; no bound without ``lo``),
    ``bool``, ``choice`` (one of ``choices``) or ``any`` (``check`` alone decides). ``nullable``: null is
    allowed too. ``required``: the config must give it (no default). ``check`` adds a rule that may look at
    the method's other values (e.g. ``top_k <= num_experts``); it runs once the type check passed."""

    name: str
    default: Any
    doc: str
    kind: str = "any"
    lo: float | None = None
    lo_open: bool = False
    choices: tuple = ()
    nullable: bool = False
    required: bool = False
    check: Check | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name}: kind {self.kind!r} not in {KINDS}")

    def allowed(self) -> str:
        """What the knob accepts, as the text of an error message."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return f"one of {list((None, *self.choices) if self.nullable else self.choices)}"
        if self.kind in ("int", "num"):
            text = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None:
                lo = int(self.lo) if self.kind == "int" else self.lo
                text += f" {'>' if self.lo_open else '>='} {lo}"
            return text + (" (or null)" if self.nullable else "")
        return "valid"

    def _type_ok(self, v: Any) -> bool:
        if v is None:
            return self.nullable or self.kind == "any"  # ``any``: the check decides about null too
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "choice":
            return v in self.choices
        if self.kind in ("int", "num"):
            if not (_is_int(v) if self.kind == "int" else _is_num(v)):
                return False
            return self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return True

    def problem(self, value: Any, values: Mapping[str, Any]) -> str | None:
        """The allowed values as text when ``value`` is wrong (``values``: the method's other knobs)."""
        if not self._type_ok(value):
            return self.allowed()
        if self.check is not None:
            return self.check(value, values)
        return None


def int_knob(name: str, default: Any, doc: str, lo: int = 1, **kw: Any) -> Knob:
    return Knob(name, default, doc, "int", lo=lo, **kw)


def num_knob(name: str, default: Any, doc: str, lo: float | None = 0, lo_open: bool = False, **kw) -> Knob:
    return Knob(name, default, doc, "num", lo=lo, lo_open=lo_open, **kw)


def bool_knob(name: str, default: bool, doc: str, **kw: Any) -> Knob:
    return Knob(name, default, doc, "bool", **kw)


def choice_knob(name: str, default: Any, choices: tuple, doc: str, **kw: Any) -> Knob:
    return Knob(name, default, doc, "choice", choices=tuple(choices), **kw)


#: keys every method has (checked by validate_config for all methods alike)
COMMON_KEYS = ("rank", "alpha", "dropout", "use_rslora", "target_modules")


def rank_multiple_of(key: str, what: str) -> Rule:
    """The rule ``rank % <key> == 0`` (each of ``<key>`` parts gets ``rank / <key>``)."""

    def rule(values: Mapping[str, Any]) -> str | None:
        rank, n = values.get("rank"), values.get(key)
        if _is_int(rank) and _is_int(n) and n >= 1 and rank >= 1 and rank % n:
            return (
                f"adapter.rank={rank}: must be a multiple of adapter.{key}={n} (each {what} gets rank/{key})"
            )
        return None

    return rule


def get_path(values: Mapping[str, Any], key: str, missing: Any = None) -> Any:
    """``values[key]`` for a dotted ``key`` (``spectral.mode``) through nested mappings; ``missing`` if absent."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return missing
        if part not in node:
            return missing
        node = node[part]
    return node


_ABSENT = object()


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method (``adapter.method=<name>``): its knobs, its layer class and its capabilities."""

    #: the value of ``adapter.method``
    name: str
    #: the layer class as ``"package.module:Class"`` (imported on first use), or the class itself
    layer: str | type
    #: one line: what the method is (paper, ``docs/methods.md`` section)
    doc: str
    #: the optional (with ``default``) and required (``required=True``) knobs besides the common keys
    #: (``rank``, ``alpha``, ``dropout``, ``use_rslora``, ``target_modules``); dotted names are nested keys
    knobs: tuple[Knob, ...] = ()
    #: rules over several knobs (e.g. rank divisible by the number of experts)
    rules: tuple[Rule, ...] = ()
    #: former knob names → their new names (a config that still sets one is refused, naming the new one)
    renamed: Mapping[str, str] = field(default_factory=dict)
    #: the update weights heads / experts by a router on each token's input (it cannot merge)
    token_routed: bool = False
    #: when the layers read ``context.task_ids``: ``never``, ``always`` (train and eval; task-aware) or
    #: ``training`` (e.g. LoRA-Split's task routing)
    task_ids: Literal["never", "always", "training"] = "never"
    #: why ``data.packing=true`` (several tasks in one row) cannot be used with these knob values, or None
    packing_conflict: Callable[[Mapping[str, Any]], str | None] | None = None
    #: the form ``mtlora.export format=peft`` writes: ``lora`` (A, B as they are), ``dora`` (+ magnitude),
    #: ``lora_from_heads`` (heads summed into one LoRA, the layer's ``peft_tensors``), or None (no peft form)
    peft_form: Literal["lora", "dora", "lora_from_heads"] | None = None
    #: equal-total-rank comparisons (``scripts/bench_adapters.py --match rank``): ``per_head`` — each of the
    #: ``heads_key`` heads gets rank R / heads; ``total`` — ``rank`` is already the total
    rank_rule: Literal["per_head", "total"] = "total"
    #: the knob holding the number of heads / experts / LoRAs / splits (None: one)
    heads_key: str | None = None
    #: last name parts of the layer's trainable routing / gating parameters (counted apart by mtlora.count)
    router_params: tuple[str, ...] = ()
    #: the method trains no weights but composes a library of trained LoRA runs (LoraHub): parameter counts
    #: add the library (``mtlora.count``)
    composes_library: bool = False

    # ------------------------------------------------------------------ knobs

    def knob(self, key: str) -> Knob:
        for k in self.knobs:
            if k.name == key:
                return k
        raise KeyError(f"adapter.method={self.name} has no knob {key!r}")

    @property
    def defaults(self) -> dict[str, Any]:
        """The optional knobs and their defaults, by (dotted) name."""
        return {k.name: k.default for k in self.knobs if not k.required}

    @property
    def required_keys(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs if k.required)

    def fill(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` with every ``None`` (a constructor argument left out) replaced by the knob's default."""
        names = {k.name for k in self.knobs}
        return {
            key: (self.knob(key).default if v is None and key in names else v) for key, v in given.items()
        }

    def errors(self, values: Mapping[str, Any], where: str = "") -> list[str]:
        """One line per wrong value among the knobs present in ``values`` (dotted keys looked up nested),
        per required knob missing and per broken rule; ``where`` follows the key (e.g. ``" (layer)"``)."""
        flat = {k.name: get_path(values, k.name, _ABSENT) for k in self.knobs}
        present = {key: v for key, v in flat.items() if v is not _ABSENT}
        for key in COMMON_KEYS:  # the rules may read them (e.g. rank % num_experts)
            if key not in present and get_path(values, key, _ABSENT) is not _ABSENT:
                present[key] = get_path(values, key)
        out = [
            f"adapter.{old}{where}: renamed to adapter.{new}; set adapter.{new} instead"
            for old, new in self.renamed.items()
            if get_path(values, old, _ABSENT) is not _ABSENT
        ]
        for k in self.knobs:
            if k.name not in present:
                if k.required:
                    out.append(f"adapter.{k.name}{where}: missing (expected {k.allowed()})")
                continue
            bad = k.problem(present[k.name], present)
            if bad is not None:
                out.append(f"adapter.{k.name}={present[k.name]!r}{where}: must be {bad}")
        if not out:
            out += [e for rule in self.rules if (e := rule(present)) is not None]
        return out

    def resolve(self, layer_name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments: ``given`` with defaults filled in (:meth:`fill`), checked; raises a
        :class:`ConfigError` naming the first wrong ``adapter.<key>`` and the layer."""
        values = self.fill(given)
        errs = self.errors(values, f" ({layer_name})")
        if errs:
            raise ConfigError(errs[0])
        return values

    # ------------------------------------------------------------------ layer

    def layer_class(self) -> type:
        """The layer class (imports its module; torch is loaded here, not before)."""
        if not isinstance(self.layer, str):
            return self.layer
        module, _, attr = self.layer.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def needs_task_ids(self) -> bool:
        return self.task_ids == "always"

    def packing_problem(self, values: Mapping[str, Any]) -> str | None:
        """Why rows packed with several tasks (``data.packing=true``) cannot train this method, or None."""
        if self.task_ids == "always":
            return (
                f"adapter.method={self.name} routes by task (one task id per row) and a packed row holds "
                "several tasks; set data.packing=false"
            )
        return self.packing_conflict(values) if self.packing_conflict is not None else None

    def describe(self) -> str:
        """The knobs as text: one line each with default, allowed values and doc."""
        lines = [f"{self.name}: {self.doc}"]
        for k in self.knobs:
            default = "required" if k.required else f"default {k.default!r}"
            lines.append(f"  {k.name} ({default}; {k.allowed()}): {k.doc}")
        return "\n".join(lines)
