"""The registry of evaluation suites: one place that names them, says what each needs and writes, and runs them.

A suite is a :class:`Suite`: a name, its ``mode`` (``teacher_forced``: one forward pass over the run's held-out
rows; ``generation``: greedy decoding), what it needs from the :class:`SuiteContext` (the run's held-out
``data``, the ``tokenizer``, the training ``task_names``), the files it writes (``metrics/eval_<output>.<ext>``
for each of ``tables``, ``predictions/<output>/<task>.jsonl``: :class:`mtlora.run.layout.RunLayout`, written by
:mod:`mtlora.eval.outputs`) and ``run(context) -> result``. Each suite registers itself in its own module
(:func:`register`); the built-in ones (:data:`BUILTIN`) are imported on the first question to the registry.
Suite modules keep their heavy imports (torch, generation, data) inside ``run``, so the names are known without
torch (``mtlora.config`` checks ``eval.suites`` against them).

Training's end of run, LoraHub and ``python -m mtlora.evaluate`` all run suites through :func:`run_suites`,
in registry order (built-ins in :data:`BUILTIN` order, then others in the order they registered).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mtlora.errors import ConfigError
from mtlora.run.layout import RunLayout

log = logging.getLogger(__name__)

TEACHER_FORCED, GENERATION = "teacher_forced", "generation"
MODES = (TEACHER_FORCED, GENERATION)
#: what a suite may need from its context
NEEDS = ("data", "tokenizer", "task_names")
#: the built-in suites and the modules that register them, in dispatch order
BUILTIN: dict[str, str] = {
    "heldin": "mtlora.eval.heldin",
    "heldin_samples": "mtlora.eval.samples",
    "bbh": "mtlora.eval.bbh_suite",
    "heldin_gen": "mtlora.eval.heldin_gen",
    "mmlu": "mtlora.eval.mmlu",
}


@dataclass
class SuiteContext:
    """What a suite runs on: the ``eval`` config group (its settings), the run's config (``data``, ``model``),
    the model and tokenizer, the dir its files go to, and optionally the run's held-out data (built from
    ``run_cfg.data`` on first use when None), the training task names, the tracker and step to log to."""

    eval_cfg: DictConfig
    run_cfg: DictConfig
    model: Any
    tokenizer: Any
    out_dir: Path
    device: Any = None
    data: Any = None
    task_names: list[str] | None = None
    tracker: Any = None
    step: int | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out_dir)

    def held_out(self):
        """The run's ``MultiTaskData`` (built once from ``run_cfg.data`` when the caller gave none)."""
        if self.data is None:
            from mtlora.data import build_data

            self.data = build_data(self.run_cfg.data, self.tokenizer, int(self.run_cfg.model.max_seq_len))
        return self.data

    def training_tasks(self) -> list[str] | None:
        """The training task names: given, else those of the held-out data when built, else None."""
        if self.task_names is not None:
            return list(self.task_names)
        return list(self.data.task_names) if self.data is not None else None

    def report(self, key: str, line: str, values: dict[str, float] | None = None) -> None:
        """Log and print a suite's summary ``line``; ``values`` (``<key>/macro``, ...) go to the tracker as
        ``eval/...`` at ``step`` and as ``final/...`` in its summary."""
        log.info("%s (tables in %s)", line, self.layout.suite(key, "md").relative_to(self.layout.root))
        print(line, flush=True)
        if self.tracker is not None and values:
            self.tracker.log({f"eval/{k}": v for k, v in values.items()}, self.step)
            self.tracker.summary({f"final/{k}": v for k, v in values.items()})


@dataclass(frozen=True)
class Suite:
    """One evaluation suite (see the module doc). ``outputs(eval_cfg)``: the names its files go under when
    not its own name (BBH: ``bbh_<protocol>``). ``switch``: a suite not listed in ``eval.suites`` but turned on
    at the end of a run by ``eval.<switch>`` (the held-in samples: ``eval.samples``)."""

    name: str
    mode: str
    run: Callable[[SuiteContext], dict | None]
    needs: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ("json", "csv", "md")
    predictions: bool = True
    outputs: Callable[[DictConfig], list[str]] | None = None
    switch: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"suite {self.name!r}: mode {self.mode!r} is not one of {MODES}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"suite {self.name!r}: needs {sorted(unknown)} are not among {NEEDS}")

    def output_names(self, eval_cfg: DictConfig | None) -> list[str]:
        return list(self.outputs(eval_cfg)) if self.outputs is not None else [self.name]

    def files(self, out_dir: Path, eval_cfg: DictConfig | None) -> list[Path]:
        """The paths this suite writes under ``out_dir`` (tables, then the predictions folder)."""
        layout = RunLayout(out_dir)
        paths = []
        for name in self.output_names(eval_cfg):
            paths += [layout.suite(name, ext) for ext in self.tables]
            if self.predictions:
                paths.append(layout.suite_predictions(name))
        return paths


_REGISTRY: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    """Add ``suite`` to the registry (a name registers once); returns it."""
    if suite.name in _REGISTRY:
        raise ValueError(f"evaluation suite {suite.name!r} is already registered")
    _REGISTRY[suite.name] = suite
    return suite


def unregister(name: str) -> None:
    """Remove a suite registered by :func:`register` (built-ins included)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    for module in BUILTIN.values():
        importlib.import_module(module)


def all_suites() -> list[Suite]:
    """Every registered suite, in dispatch order."""
    _load_builtins()
    order = list(BUILTIN)
    registered = list(_REGISTRY)
    return sorted(
        _REGISTRY.values(),
        key=lambda s: order.index(s.name) if s.name in order else len(order) + registered.index(s.name),
    )


def get(name: str) -> Suite:
    """The suite ``name``; a ConfigError naming ``eval.suites`` and the choices when there is none."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"eval.suites: unknown suite {name!r}; choose from {list(suite_names())}") from None


def suite_names() -> tuple[str, ...]:
    """The names ``eval.suites`` accepts (suites with a ``switch`` are turned on by their own key)."""
    return tuple(s.name for s in all_suites() if s.switch is None)


def check_suites(names: Sequence[str]) -> list[str]:
    """``names`` when it is a non-empty list of :func:`suite_names`; else a one-line ConfigError naming
    ``eval.suites``."""
    names = list(names)
    known = suite_names()
    if not names or any(n not in known for n in names):
        raise ConfigError(
            f"eval.suites={names}: must be a non-empty list drawn from {list(known)} (e.g. eval=bbh)"
        )
    return names


def output_names(names: Sequence[str], eval_cfg: DictConfig | None) -> list[str]:
    """The output names (``metrics/eval_<name>.*``, ``predictions/<name>/``) of the suites ``names``."""
    return [o for n in names for o in get(n).output_names(eval_cfg)]


def end_of_run_suites(eval_cfg: DictConfig) -> list[str]:
    """The suites the end of a training (or LoraHub) run dispatches to :func:`run_suites`: those turned on by
    their own ``switch`` key, and the generation suites of ``eval.suites``. The teacher-forced ``heldin``
    suite is the training loop's own (every ``eval.every_steps`` and at the end, on every rank in lockstep
    under ZeRO-3, before the adapter is saved)."""
    listed = set(eval_cfg.suites)
    return [
        s.name
        for s in all_suites()
        if (s.switch is not None and eval_cfg.get(s.switch))
        or (s.switch is None and s.mode == GENERATION and s.name in listed)
    ]


def _check_context(suite: Suite, ctx: SuiteContext) -> None:
    if "tokenizer" in suite.needs and ctx.tokenizer is None:
        raise ConfigError(f"eval suite {suite.name!r} needs a tokenizer; this evaluation has none")
    if "data" in suite.needs and ctx.data is None and ctx.run_cfg.get("data") is None:
        raise ConfigError(
            f"eval suite {suite.name!r} needs the run's held-out data; the config has no data group"
        )


def run_suites(names: Sequence[str], ctx: SuiteContext) -> dict[str, dict]:
    """Run the suites ``names`` on ``ctx`` in registry order; returns their results by name (a suite whose
    ``run`` returns None adds none). Each suite writes its own files into ``ctx.out_dir``."""
    wanted = set(names)
    for n in wanted:
        get(n)  # a ConfigError naming eval.suites for an unknown name
    results: dict[str, dict] = {}
    for suite in all_suites():
        if suite.name not in wanted:
            continue
        _check_context(suite, ctx)
        result = suite.run(ctx)
        if result is not None:
            results[suite.name] = result
    return results
