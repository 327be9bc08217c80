"""Check a composed config before anything is built.

Every rule names its key and what is allowed; all violations are reported together in one
:class:`~mtlora.errors.ConfigError`. :func:`validate_config` runs the rules of each group in turn: the model
and adapter rules here, the others from one module per concern (:mod:`.train_rules`, :mod:`.data_rules`,
:mod:`.alignment_rules`, :mod:`.eval_rules`, :mod:`.hardware_rules`, :mod:`.run_rules`) and the rules that
tie groups together from :mod:`.cross_rules`; :mod:`.checker` holds the shared rule checker. The
target-module check needs the model's module names and runs later, on the meta device
(:func:`mtlora.adapters.check_targets`).
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from mtlora.adapters.registry import all_specs, get_spec, method_names
from mtlora.adapters.spec import MethodSpec
from mtlora.config.alignment_rules import check_alignment
from mtlora.config.checker import Checker, leaves, non_finite_numbers
from mtlora.config.cross_rules import check_meta, check_task_balanced_batches
from mtlora.config.data_rules import check_data, check_packing_keys
from mtlora.config.eval_rules import check_eval, check_suites
from mtlora.config.hardware_rules import check_hardware
from mtlora.config.reference import Reference, reference_errors
from mtlora.config.run_rules import check_run, check_tracker
from mtlora.config.train_rules import build_optimization, check_train
from mtlora.data.selection import selected_tasks
from mtlora.diagnostics.config import check_diagnostics_config, check_diagnostics_hardware
from mtlora.errors import ConfigError
from mtlora.eval.suites import suite_names
from mtlora.models.dtypes import DTYPES

__all__ = ["build_optimization", "leaves", "non_finite_numbers", "validate_config"]


def foreign_knobs(spec: MethodSpec, adapter: DictConfig) -> list[str]:
    """One error per top-level ``adapter`` key that is a knob of other methods but not of ``spec``'s (a
    knob the chosen method would silently ignore)."""
    own = {k.name.split(".")[0] for k in spec.knobs} | set(spec.renamed)
    owners: dict[str, list[str]] = {}
    for other in all_specs():
        for k in other.knobs:
            owners.setdefault(k.name.split(".")[0], []).append(other.name)
    return [
        f"adapter.{key}={adapter.get(key)!r}: not a knob of adapter.method={spec.name} (a knob of "
        f"{sorted(set(owners[key]))}); drop it or choose one of those methods"
        for key in adapter
        if key in owners and key not in own
    ]


def validate_config(cfg: DictConfig, reference: Reference | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid value of ``cfg`` (a composed train config).

    ``reference``: the same group choices composed without key overrides
    (:func:`mtlora.config.reference.hydra_reference`); given, keys unknown to the chosen presets and
    non-boolean values of boolean keys are errors too."""
    c = Checker(cfg)
    c.errors += non_finite_numbers(cfg)
    c.errors += reference_errors(cfg, reference)
    # model
    c.choice("model.init", ("pretrained", "random"))
    c.choice("model.dtype", tuple(DTYPES))
    c.choice("model.tokenizer.kind", ("bytes", "hub"))
    c.int_("model.max_seq_len", 8)
    if cfg.model.get("init") == "pretrained" and not cfg.model.get("hub_id"):
        c.errors.append("model.hub_id: must be set when model.init=pretrained")
    if cfg.model.get("init") == "random" and cfg.model.get("arch") is None:
        c.errors.append("model.arch: must be set when model.init=random")
    # adapter
    c.choice("adapter.method", method_names())
    c.int_("adapter.rank", 1)
    c.num("adapter.alpha", 0, lo_open=True)
    c.num("adapter.dropout", 0, 1, hi_open=True)
    c.rule(
        "adapter.target_modules",
        lambda v: (isinstance(v, str) and v != "") or (isinstance(v, ListConfig) and len(v) > 0),
        "a non-empty list of module names, a regex string, or 'all-linear'",
    )
    # the chosen method's knobs, by its spec (mtlora.adapters.methods): default, allowed values, rules
    spec = get_spec(cfg.adapter.get("method"))
    if spec is not None:
        c.errors += spec.errors(cfg.adapter)
        c.errors += foreign_knobs(spec, cfg.adapter)
    # a task-aware method's num_tasks must equal the data's tasks
    if spec is not None and "num_tasks" in spec.required_keys:
        n_tasks = c.get("adapter.num_tasks")
        try:
            tasks_sel = selected_tasks(cfg.data)
        except ConfigError:
            tasks_sel = None  # reported by the data rules below
        if isinstance(n_tasks, int) and n_tasks >= 1 and tasks_sel is not None and n_tasks != len(tasks_sel):
            c.errors.append(
                f"adapter.num_tasks={n_tasks}: must equal the number of data tasks, {len(tasks_sel)} "
                f"({tasks_sel}); set adapter.num_tasks={len(tasks_sel)}"
            )
    # MeTA-LoRA's meta-learning step (adapter=meta_lora)
    check_meta(c, cfg)
    check_alignment(c, cfg)
    check_data(c, cfg)
    check_train(c, cfg)
    check_packing_keys(c, cfg)
    # eval
    c.rule(
        "eval.suites",
        lambda v: isinstance(v, ListConfig) and all(s in suite_names() for s in v),
        f"a list drawn from {list(suite_names())}",
    )
    check_eval(c)
    # diagnostics (conf/diagnostics)
    c.errors += check_diagnostics_config(cfg.get("diagnostics"))
    c.errors += check_diagnostics_hardware(cfg)  # none under ZeRO-3 (partitioned parameters)
    check_suites(c)
    check_hardware(c, cfg)
    check_run(c, cfg)
    if not c.errors:
        check_task_balanced_batches(c, cfg)
    if c.errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(c.errors))
    check_tracker(cfg)  # an optional tracker package (tensorboard, mlflow) that is not installed
