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

from mtlora.adapters.moelora import DROPOUT_PLACES as MOE_DROPOUT_PLACES
from mtlora.adapters.moelora import EMBEDDING_ROWS
from mtlora.adapters.mtl_lora import LAMBDA_FORMATS
from mtlora.adapters.multihead import COMBINES, DROPOUT_PLACES, INIT_SCALES, INITS, MultiHeadLoraLinear
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.config.alignment_rules import check_alignment
from mtlora.config.checker import MISSING as _MISSING
from mtlora.config.checker import Checker, leaves, non_finite_numbers
from mtlora.config.checker import int_ok as _int
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
from mtlora.models.dtypes import DTYPES

__all__ = ["build_optimization", "leaves", "non_finite_numbers", "validate_config"]

EVAL_SUITES = ("heldin", "bbh", "heldin_gen", "mmlu")


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
    c.choice("adapter.method", tuple(ADAPTER_METHODS))
    c.int_("adapter.rank", 1)
    c.num("adapter.alpha", 0, lo_open=True)
    c.num("adapter.dropout", 0, 1, hi_open=True)
    c.rule(
        "adapter.target_modules",
        lambda v: (isinstance(v, str) and v != "") or (isinstance(v, ListConfig) and len(v) > 0),
        "a non-empty list of module names, a regex string, or 'all-linear'",
    )
    # multi-head adapters (hydralora, rlora, mlora): checked when present, num_heads required by them
    cls = ADAPTER_METHODS.get(cfg.adapter.get("method"))
    if c.get("adapter.num_heads") is not _MISSING or (cls and issubclass(cls, MultiHeadLoraLinear)):
        c.int_("adapter.num_heads", 1)
    # MOELoRA's dropout is on its input only: one mask per expert or one shared
    places = MOE_DROPOUT_PLACES if cfg.adapter.get("method") == "moelora" else DROPOUT_PLACES
    for key, values in (
        ("dropout_place", places),
        ("init", INITS),
        ("init_scale", INIT_SCALES),
        ("combine", COMBINES),
    ):
        if key == "dropout_place" and cfg.adapter.get("method") == "mtlora":
            # mtLoRA: null = the released code's choice by fine-grained routing (mtlora.adapters.mtlora_adapter)
            values = (None, *values)
        if c.get(f"adapter.{key}") is not _MISSING:
            c.choice(f"adapter.{key}", values)
    if c.get("adapter.stable_gamma") is not _MISSING:
        c.num("adapter.stable_gamma", 0, lo_open=True)
    if c.get("adapter.init_offset") is not _MISSING:
        c.rule("adapter.init_offset", lambda v: isinstance(v, bool), "true or false")
    # task-aware adapters (mtl_lora, moelora): num_tasks required by them, and equal to the data's tasks
    if c.get("adapter.num_tasks") is not _MISSING or (cls and cls.needs_task_ids):
        c.int_("adapter.num_tasks", 1)
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
    for key in ("num_up", "num_experts", "task_embed_dim"):
        if c.get(f"adapter.{key}") is not _MISSING:
            c.int_(f"adapter.{key}", 1)
    if c.get("adapter.task_embedding_rows") is not _MISSING:
        c.choice("adapter.task_embedding_rows", EMBEDDING_ROWS)
    if c.get("adapter.tau") is not _MISSING:
        c.num("adapter.tau", 0, lo_open=True)
    if c.get("adapter.lambda_format") is not _MISSING:
        c.choice("adapter.lambda_format", LAMBDA_FORMATS)
    if c.get("adapter.detach_norm") is not _MISSING:
        c.rule("adapter.detach_norm", lambda v: isinstance(v, bool), "true or false")
    n_exp, rank = c.get("adapter.num_experts"), c.get("adapter.rank")
    method = cfg.adapter.get("method")
    # MOELoRA splits the total rank over its experts (MoLoRA's experts each have the full rank)
    if method == "moelora" and _int(1)(n_exp) and _int(1)(rank) and rank % n_exp:
        c.errors.append(f"adapter.rank={rank}: must be a multiple of adapter.num_experts={n_exp}")
    # parallel LoRAs (multilora, lora_split, molora)
    if c.get("adapter.num_loras") is not _MISSING:
        c.int_("adapter.num_loras", 1)
    if c.get("adapter.num_splits") is not _MISSING:
        c.int_("adapter.num_splits", 1)
        n_split = c.get("adapter.num_splits")
        if _int(1)(n_split) and _int(1)(rank) and rank % n_split:
            c.errors.append(f"adapter.rank={rank}: must be a multiple of adapter.num_splits={n_split}")
        c.choice("adapter.split_routing", ("task", "none"))
        c.rule(
            "adapter.split_of_task",
            lambda v: (
                v is None
                or (isinstance(v, ListConfig) and len(v) > 0 and all(_int(0)(t) and t < n_split for t in v))
            ),
            f"null or a non-empty list of split indices in [0, {n_split})",
        )
    if c.get("adapter.top_k") is not _MISSING:
        c.rule(
            "adapter.top_k",
            lambda v: v is None or (_int(1)(v) and (not _int(1)(n_exp) or v <= n_exp)),
            f"null (dense) or an integer in [1, adapter.num_experts={n_exp}]",
        )
    if c.get("adapter.balance_weight") is not _MISSING:
        c.num("adapter.balance_weight", 0)
    # mtLoRA (component or block placement, fine-grained routing, balance loss, spectral regulariser)
    for key, values in (
        ("placement", ("component", "block_ffn", "block_attn", "both")),
        ("block_style", ("lowrank", "bottleneck", "adaptformer")),
        ("spectral.mode", ("self_gram", "cross_expert", "none")),
    ):
        if c.get(f"adapter.{key}") is not _MISSING:
            c.choice(f"adapter.{key}", values)
    if c.get("adapter.block_modules") is not _MISSING:
        c.rule(
            "adapter.block_modules",
            lambda v: (
                isinstance(v, DictConfig)
                and set(v) <= {"ffn", "attn"}
                and all(isinstance(x, str) and x for x in v.values())
            ),
            "a mapping with keys ffn/attn and non-empty module names",
        )
    for key, lo, optional in (
        ("routing_group_size", 1, True),
        ("routing_groups", 1, False),
        ("spectral.every_steps", 1, True),
        ("spectral.max_matrices", 1, False),
    ):
        if c.get(f"adapter.{key}") is not _MISSING:
            c.int_(f"adapter.{key}", lo, optional=optional)
    for key in ("blc_alpha", "spectral.lambda"):
        if c.get(f"adapter.{key}") is not _MISSING:
            c.num(f"adapter.{key}", 0)
    if c.get("adapter.adaptformer_scale_init") is not _MISSING:
        c.num("adapter.adaptformer_scale_init")
    if c.get("adapter.blc_grad") is not _MISSING:
        c.rule("adapter.blc_grad", lambda v: isinstance(v, bool), "true or false")
    # MeTA-LoRA's meta-learning step (adapter=meta_lora)
    check_meta(c, cfg)
    check_alignment(c, cfg)
    check_data(c, cfg)
    check_train(c, cfg)
    check_packing_keys(c, cfg)
    # eval
    c.rule(
        "eval.suites",
        lambda v: isinstance(v, ListConfig) and all(s in EVAL_SUITES for s in v),
        f"a list drawn from {list(EVAL_SUITES)}",
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
