"""Check a composed config before anything is built.

Every rule names its key and what is allowed; all violations are reported together in one
:class:`~mtlora.errors.ConfigError`. The target-module check needs the model's module names and runs
later, on the meta device (:func:`mtlora.adapters.check_targets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlora.adapters.moelora import DROPOUT_PLACES as MOE_DROPOUT_PLACES
from mtlora.adapters.moelora import EMBEDDING_ROWS
from mtlora.adapters.mtl_lora import LAMBDA_FORMATS
from mtlora.adapters.multihead import COMBINES, DROPOUT_PLACES, INIT_SCALES, INITS, MultiHeadLoraLinear
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.config.reference import Reference, reference_errors
from mtlora.data.build import rows_per_task, selected_tasks
from mtlora.data.mixture import STRATEGIES
from mtlora.data.packing import packing_conflicts
from mtlora.data.sources import SOURCE_TYPES
from mtlora.diagnostics.config import check_diagnostics_config, check_diagnostics_hardware
from mtlora.errors import ConfigError
from mtlora.losses.causal_lm import LOSS_IMPLS
from mtlora.models.loading import DTYPES
from mtlora.run.schedule import valid_every
from mtlora.run.tracker import tracker_name
from mtlora.training.alignment_window import GROUPINGS, WEIGHTINGS, AlignmentTerm, check_alignment_rows
from mtlora.training.compile import compile_settings
from mtlora.training.meta_lora import MetaLearner

ALIGNMENTS = ("none", "kl", "mmd")
EVAL_SUITES = ("heldin", "bbh", "heldin_gen", "mmlu")
LOGGERS = ("none", "csv", "wandb", "wandb_offline", "tensorboard", "mlflow")
_MISSING = object()
EVERY = "an integer >= 1, 'auto' (every 10% of the steps) or null (never)"


def _int(lo: int | None = None, optional: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)

    return ok


def _num(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False, optional=False):
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    return ok


def _one_of(values) -> Callable[[Any], bool]:
    return lambda v: v in values


def _describe_range(lo, hi, lo_open=False, hi_open=False, optional=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts) + (" (or null)" if optional else "")


class _Checker:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.errors: list[str] = []

    def get(self, key: str) -> Any:
        v = OmegaConf.select(self.cfg, key, default=_MISSING, throw_on_missing=False)
        return v

    def rule(self, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
        v = self.get(key)
        if v is _MISSING:
            self.errors.append(f"{key}: missing (expected {allowed})")
        elif not ok(v):
            self.errors.append(f"{key}={v!r}: must be {allowed}")

    def int_(self, key: str, lo: int | None = None, optional: bool = False) -> None:
        self.rule(key, _int(lo, optional), "an integer " + _describe_range(lo, None, optional=optional))

    def num(self, key: str, lo=None, hi=None, lo_open=False, hi_open=False, optional=False) -> None:
        self.rule(
            key,
            _num(lo, hi, lo_open, hi_open, optional),
            "a number " + _describe_range(lo, hi, lo_open, hi_open, optional),
        )

    def choice(self, key: str, values) -> None:
        self.rule(key, _one_of(values), f"one of {list(values)}")


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a config node (list items as ``key[i]``); interpolations are
    resolved, and a leaf that cannot be resolved (e.g. ``${hydra:...}`` outside Hydra) is skipped."""
    if isinstance(node, DictConfig):
        for k in list(node):
            key = f"{prefix}.{k}" if prefix else str(k)
            try:
                v = node[k]
            except Exception:  # an interpolation that cannot resolve here
                continue
            yield from leaves(v, key)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            try:
                v = node[i]
            except Exception:
                continue
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def non_finite_numbers(cfg: DictConfig) -> list[str]:
    """One error per float leaf of ``cfg`` that is NaN or infinite (no key of the project accepts one: a
    NaN dropout is no dropout, a NaN weight an epoch of -2^65 examples)."""
    return [
        f"{key}={value!r}: must be a finite number"
        for key, value in leaves(cfg)
        if isinstance(value, float) and not math.isfinite(value)
    ]


def _check_bbh(c: _Checker) -> None:
    from mtlora.eval.bbh import PROTOCOLS, TASKS, bbh_dir

    n_errors = len(c.errors)
    c.choice("eval.bbh.protocol", tuple(PROTOCOLS))
    c.rule(
        "eval.bbh.tasks",
        lambda v: v is None or (isinstance(v, ListConfig) and set(v) <= set(TASKS)),
        f"null (all) or a list drawn from the 27 BBH tasks {list(TASKS)}",
    )
    c.int_("eval.bbh.limit", 1, optional=True)
    c.int_("eval.bbh.max_new_tokens", 1, optional=True)
    c.int_("eval.bbh.batch_tokens", 1)
    c.int_("eval.bbh.max_batch_size", 1, optional=True)
    if c.get("eval.bbh.max_input_tokens") is not _MISSING:  # absent in configs of older runs
        c.rule(
            "eval.bbh.max_input_tokens",
            lambda v: v == "model" or _int(0, True)(v),
            "null, 0 (never cut), an integer >= 1 or 'model' (model_max_length - max_new_tokens)",
        )
    if c.get("eval.bbh.model_max_length") is not _MISSING:
        c.int_("eval.bbh.model_max_length", 1, optional=True)
    if c.get("eval.bbh.truncation_side") is not _MISSING:
        c.choice("eval.bbh.truncation_side", (None, "left", "right"))
    c.rule(
        "eval.bbh.task_id",
        lambda v: v is None or isinstance(v, str) or _int(0)(v),
        "null, a training task id (int >= 0) or a training task name",
    )
    if len(c.errors) == n_errors:  # prompt room of the "model" truncation, when the length is known now
        from mtlora.eval.bbh_suite import check_room

        model = c.get("model")
        try:
            check_room(c.get("eval.bbh"), None if model is _MISSING else model)
        except ConfigError as e:
            c.errors.append(str(e))
    data_dir = c.get("eval.bbh.data_dir") or None
    name = c.get("eval.bbh.protocol")
    protocol = PROTOCOLS.get(name) if isinstance(name, str) else None
    if data_dir == "hub" and protocol is not None and protocol.prompt.demos == "task_file":
        return  # examples from the hub, no prompt files needed
    try:
        bbh_dir(data_dir)
    except Exception as e:  # DataError naming the path, MTLORA_DATA_DIR and the hub id
        c.errors.append(f"eval.bbh.data_dir: {e}")


def _check_generation_suites(c: _Checker, suites) -> None:
    """``eval.heldin_gen`` / ``eval.mmlu`` (mtlora.eval.heldin_gen, mtlora.eval.mmlu) and the tasks' metrics."""
    from mtlora.eval.metrics import METRICS
    from mtlora.eval.mmlu import SUBJECTS, mmlu_dir

    if "heldin_gen" in suites:
        for k in ("max_new_tokens", "batch_tokens"):
            c.int_(f"eval.heldin_gen.{k}", 1)
        for k in ("limit", "max_batch_size"):
            c.int_(f"eval.heldin_gen.{k}", 1, optional=True)
        if c.get("eval.heldin_gen.max_input_tokens") is not _MISSING:  # absent in configs of older runs
            c.int_("eval.heldin_gen.max_input_tokens", 1, optional=True)
        if c.get("eval.heldin_gen.truncation_side") is not _MISSING:
            c.choice("eval.heldin_gen.truncation_side", ("left", "right"))
        for name in c.cfg.data.get("tasks") or {}:  # optional key, default exact
            if c.get(f"data.tasks.{name}.eval.metric") not in (_MISSING, None, *METRICS):
                c.rule(
                    f"data.tasks.{name}.eval.metric", _one_of(METRICS), f"one of {list(METRICS)} (or absent)"
                )
    if "mmlu" in suites:
        c.rule(
            "eval.mmlu.subjects",
            lambda v: v is None or (isinstance(v, ListConfig) and set(v) <= set(SUBJECTS)),
            f"null (all) or a list drawn from the 57 MMLU subjects {list(SUBJECTS)}",
        )
        c.int_("eval.mmlu.limit", 1, optional=True)
        c.rule(
            "eval.mmlu.shots",
            lambda v: _int(0)(v) and v <= 5,
            "an integer from 0 to 5 (dev rows per subject)",
        )
        for k in ("max_new_tokens", "batch_tokens"):
            c.int_(f"eval.mmlu.{k}", 1)
        c.int_("eval.mmlu.max_batch_size", 1, optional=True)
        c.rule(
            "eval.mmlu.task_id",
            lambda v: isinstance(v, str) or _int(0)(v),
            "a task id (int >= 0) or task name",
        )
        # an explicit data dir is checked up front; the default ($MTLORA_DATA_DIR/mmlu, absent offline) when the
        # suite runs (after the adapter is saved), so the optional suite never blocks composing eval=mmlu
        if c.get("eval.mmlu.data_dir") not in (_MISSING, None, "hub"):
            try:
                mmlu_dir(c.get("eval.mmlu.data_dir"))
            except Exception as e:  # DataError naming the path, MTLORA_DATA_DIR and the hub id
                c.errors.append(f"eval.mmlu.data_dir: {e}")


def _check_optimization(c: _Checker) -> None:
    """The usual optimizer keys (when present) and the scheduler name of ``transformers.get_scheduler``;
    :func:`build_optimization` then builds both once, which checks every other keyword."""
    if c.get("train.optimizer.weight_decay") is not _MISSING:
        c.num("train.optimizer.weight_decay", 0)
    if c.get("train.optimizer.eps") is not _MISSING:
        c.num("train.optimizer.eps", 0, lo_open=True)
    if c.get("train.optimizer.betas") is not _MISSING:
        c.rule(
            "train.optimizer.betas",
            lambda v: (
                isinstance(v, ListConfig) and len(v) == 2 and all(_num(0, 1, hi_open=True)(b) for b in v)
            ),
            "two numbers in [0, 1) (e.g. [0.9, 0.999])",
        )
    if str(c.get("train.scheduler._target_")) == "transformers.get_scheduler":
        from transformers import SchedulerType

        c.choice("train.scheduler.name", tuple(t.value for t in SchedulerType))


def build_optimization(cfg: DictConfig) -> None:
    """Build ``train.optimizer`` and ``train.scheduler`` once on a one-element parameter, so that a value the
    rules above do not cover (a keyword of another optimizer class, a scheduler argument) fails before the
    run dir is claimed, as a :class:`ConfigError` naming the group."""
    import torch
    from hydra.utils import instantiate

    p = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = instantiate(cfg.train.optimizer)(params=[p])
    except Exception as e:
        raise ConfigError(
            f"train.optimizer ({cfg.train.optimizer.get('_target_')}): {type(e).__name__}: {e}"
        ) from e
    try:
        instantiate(cfg.train.scheduler)(optimizer=opt, num_warmup_steps=1, num_training_steps=10)
    except Exception as e:
        raise ConfigError(
            f"train.scheduler ({cfg.train.scheduler.get('_target_')}): {type(e).__name__}: {e}"
        ) from e


def _check_hardware(c: _Checker, cfg: DictConfig) -> None:
    """Multi-node and DeepSpeed keys of the hardware group (conf/hardware/gpu*_zero*.yaml, cpu2_zero*.yaml,
    multinode.yaml)."""
    hw = cfg.hardware
    machines = hw.get("num_machines") or 1
    if hw.get("num_machines") is not None:
        c.int_("hardware.num_machines", 1)
    if isinstance(machines, int) and machines > 1:
        c.int_("hardware.machine_rank", 0)
        c.int_("hardware.main_process_port", 1)
        c.rule("hardware.main_process_ip", lambda v: isinstance(v, str) and bool(v), "a host name or address")
        rank = hw.get("machine_rank")
        if isinstance(rank, int) and rank >= machines:
            c.errors.append(f"hardware.machine_rank={rank}: must be < hardware.num_machines={machines}")
        if hw.get("launcher") != "accelerate":
            c.errors.append("hardware.launcher: must be 'accelerate' when hardware.num_machines > 1")
    ds = hw.get("deepspeed")
    if not ds:
        return
    c.choice("hardware.deepspeed.stage", (2, 3))
    for key in ("offload_optimizer", "offload_param", "overlap_comm"):
        if ds.get(key) is not None:
            c.rule(f"hardware.deepspeed.{key}", lambda v: isinstance(v, bool), "true or false")
    c.int_("hardware.deepspeed.bucket_size", 1, optional=True)
    if ds.get("param_persistence_threshold") is not None:
        c.int_("hardware.deepspeed.param_persistence_threshold", 0)
    if ds.get("offload_param") and ds.get("stage") != 3:
        c.errors.append("hardware.deepspeed.offload_param: needs stage 3 (ZeRO-2 partitions no parameters)")
    if hw.get("launcher") != "accelerate":
        c.errors.append("hardware.deepspeed: needs hardware.launcher=accelerate")
    why = "not supported with hardware.deepspeed"
    if cfg.adapter.get("meta"):
        c.errors.append(f"adapter.meta: {why} (the meta step averages gradients itself)")
    if ds.get("stage") == 3 and (cfg.train.get("loss") or {}).get("impl", "full") != "full":
        c.errors.append("train.loss.impl: must be 'full' under ZeRO-3 (chunked CE reads the head weight)")


def validate_config(cfg: DictConfig, reference: Reference | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid value of ``cfg`` (a composed train config).

    ``reference``: the same group choices composed without key overrides
    (:func:`mtlora.config.reference.hydra_reference`); given, keys unknown to the chosen presets and
    non-boolean values of boolean keys are errors too."""
    c = _Checker(cfg)
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
    if cfg.adapter.get("meta"):
        try:
            MetaLearner.from_config(cfg.adapter.meta)
        except ConfigError as e:
            c.errors.append(str(e))
        if cfg.alignment.get("name", "none") != "none":
            c.errors.append("adapter.meta: cannot be combined with an alignment loss; set alignment=none")
    # alignment
    c.choice("alignment.name", ALIGNMENTS)
    c.num("alignment.weight", 0)
    if cfg.alignment.get("name", "none") != "none":
        c.choice("alignment.pool", ("none", "mean", "masked_mean"))
        c.choice("alignment.pair_reduce", ("sum", "mean"))
        c.choice("alignment.layer_reduce", ("mean", "sum"))
        c.choice("alignment.window", ("micro", "step"))
        c.rule("alignment.gather", lambda v: isinstance(v, bool), "true or false")
        for key, allowed in (("grouping", GROUPINGS), ("weighting", WEIGHTINGS)):
            if c.get(f"alignment.{key}") is not _MISSING:
                c.choice(f"alignment.{key}", allowed)
        if c.get("alignment.backprop") is not _MISSING:
            c.rule("alignment.backprop", lambda v: isinstance(v, bool), "true or false")
        pad_to = c.get("alignment.pad_to")
        if pad_to not in (_MISSING, None):
            max_len = cfg.model.get("max_seq_len")
            c.rule(
                "alignment.pad_to",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= (max_len or 1),
                f"null or a number of positions >= model.max_seq_len ({max_len}), so that every row fits",
            )
        if not c.errors:  # the cross-key rules of the term (window / pool / pad_to / grouping)
            try:
                AlignmentTerm.from_config(cfg.alignment)
            except ConfigError as e:
                c.errors.append(str(e))
        try:
            n_align = len(selected_tasks(cfg.data))
        except ConfigError:
            n_align = None  # reported by the data rules below
        if n_align is not None and n_align < 2:
            c.errors.append(
                f"alignment={cfg.alignment.get('name')}: aligns the representations of different tasks, but the "
                f"data has {n_align} task (data.select); its term would be 0: use alignment=none or two or "
                "more tasks"
            )
        c.rule(
            "alignment.layers",
            lambda v: v in ("all", "attn", "mlp") or (isinstance(v, ListConfig) and len(v) > 0),
            "'all', 'attn', 'mlp' or a non-empty list of layer-name substrings",
        )
    # data
    tasks = cfg.data.get("tasks") or {}
    if not tasks:
        c.errors.append(f"data.tasks: data={cfg.data.get('name')} defines no task")
    select = cfg.data.get("select")
    if select:
        unknown = [t for t in select if t not in tasks]
        if unknown:
            c.errors.append(f"data.select: unknown task(s) {unknown}; allowed: {list(tasks)}")
    c.choice("data.sampling.strategy", STRATEGIES)
    if cfg.data.get("sampling", {}).get("strategy") == "weights":
        weights = cfg.data.sampling.get("weights") or {}
        used = list(select) if select else list(tasks)
        missing, unknown = [t for t in used if t not in weights], [t for t in weights if t not in used]
        if missing or unknown:
            c.errors.append(
                f"data.sampling.weights: needs one weight per task {used}; missing {missing}, "
                f"unknown {unknown}"
            )
        for t in weights:
            c.num(f"data.sampling.weights.{t}", 0)
        valid = not missing and not unknown and all(_num(0)(weights[t]) for t in used)
        if valid and not sum(weights[t] for t in used) > 0:
            c.errors.append("data.sampling.weights: must have a positive sum")
    c.num("data.sampling.temperature", 0, lo_open=True)
    c.int_("data.budget", 1, optional=True)
    c.choice("data.on_bad_row", ("error", "skip"))
    for name in tasks:
        c.choice(f"data.tasks.{name}.source.type", SOURCE_TYPES)
        c.num(f"data.tasks.{name}.eval.fraction", 0, 1, hi_open=True)
        c.int_(f"data.tasks.{name}.max_train_examples", 1, optional=True)
    # train
    c.int_("train.max_steps", 1, optional=True)
    c.int_("train.epochs", 1)
    c.int_("train.micro_batch_size", 1)
    c.int_("train.gradient_accumulation_steps", 1)
    c.num("train.max_grad_norm", 0, optional=True)
    c.choice("train.precision", ("fp32", "bf16"))
    c.num("train.warmup_ratio", 0, 1)
    c.int_("train.log_every", 1)
    c.rule("train.checkpoint_every", valid_every, EVERY)
    c.int_("train.keep_checkpoints", 1)
    c.num("train.optimizer.lr", 0, lo_open=True)
    _check_optimization(c)
    c.num("train.loss_watchdog.factor", 1, lo_open=True)
    c.int_("train.loss_watchdog.patience", 1)
    if c.get("train.compile") is not _MISSING:  # regional compilation (mtlora.training.compile)
        try:
            settings = compile_settings(cfg.train.compile)
        except ConfigError as e:
            c.errors.append(str(e))
        else:
            if settings is not None and (cfg.hardware.get("deepspeed") or {}).get("stage") == 3:
                c.errors.append("train.compile.enabled: not supported under ZeRO-3 (partitioned parameters)")
    if c.get("train.loss") is not _MISSING:  # memory-lean loss (mtlora.losses.causal_lm)
        c.choice("train.loss.impl", LOSS_IMPLS)
        c.int_("train.loss.chunk_tokens", 1)
    if c.get("data.packing") not in (_MISSING, None):  # optional keys (mtlora.data.packing)
        c.rule("data.packing", lambda v: isinstance(v, bool), "true or false")
        c.errors += packing_conflicts(cfg)
    # eval
    c.rule(
        "eval.suites",
        lambda v: isinstance(v, ListConfig) and all(s in EVAL_SUITES for s in v),
        f"a list drawn from {list(EVAL_SUITES)}",
    )
    c.int_("eval.batch_size", 1)
    c.rule("eval.every_steps", valid_every, EVERY)
    c.int_("eval.max_examples_per_task", 1, optional=True)
    if c.get("eval.samples") not in (_MISSING, None):  # mtlora.eval.samples
        c.int_("eval.samples.per_task", 0)
        c.int_("eval.samples.max_new_tokens", 1)
    # diagnostics (conf/diagnostics)
    c.errors += check_diagnostics_config(cfg.get("diagnostics"))
    c.errors += check_diagnostics_hardware(cfg)  # none under ZeRO-3 (partitioned parameters)
    if "bbh" in (c.get("eval.suites") or ()):  # BBH suite (mtlora.eval.bbh_suite), data dir checked up front
        _check_bbh(c)
    if {"heldin_gen", "mmlu"} & set(
        c.get("eval.suites") or ()
    ):  # generation suites, MMLU data checked up front
        _check_generation_suites(c, set(c.get("eval.suites")))
    # hardware / logger / run
    c.choice("hardware.device", ("cpu", "cuda"))
    c.int_("hardware.num_processes", 1)
    c.choice("hardware.launcher", ("none", "accelerate"))
    if cfg.hardware.get("num_processes", 1) > 1 and cfg.hardware.get("launcher") != "accelerate":
        c.errors.append("hardware.launcher: must be 'accelerate' when hardware.num_processes > 1")
    _check_hardware(c, cfg)
    c.choice("logger.name", LOGGERS)
    c.int_("seed", 0)
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).exists():
        c.errors.append(f"resume={resume!r}: must be null, 'auto', or an existing run/checkpoint dir")
    if not c.errors:
        try:
            k = rows_per_task(cfg)
            check_alignment_rows(cfg, k, len(selected_tasks(cfg.data)))  # rows behind each statistic
        except ConfigError as e:
            c.errors.append(str(e))
    if c.errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(c.errors))
    tracker_name(cfg.logger)  # an optional tracker package (tensorboard, mlflow) that is not installed
