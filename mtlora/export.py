"""Export a finished run's adapter for use outside mtlora: as a peft LoRA, or merged into the base model.

Usage::

    python -m mtlora.export run_dir=RUN format=peft   out=DIR   # peft LoRA (adapter_config.json + weights)
    python -m mtlora.export run_dir=RUN format=merged out=DIR   # a full HF model with the adapter merged in
    python -m mtlora.export run_dir=RUN format=merged out=DIR task_id=arithmetic   # task-aware: one task

Options: ``overwrite=true`` (write into a non-empty ``out``; never into a run's ``adapter/`` or into
another run dir), ``allow_incomplete=true`` (export a run that
is not ``COMPLETED``), ``trust_remote_code=true`` (load a run whose config enables remote code, see
:func:`mtlora.trained_run.guard_remote_code`). ``out`` defaults to ``RUN/export/<format>``.

``format=peft`` writes files only (peft need not be installed to export)::

    DIR/adapter_config.json          peft's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    DIR/adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
                                     (+ .lora_magnitude_vector for DoRA)
    DIR/base_model/                  config-built models (model.init=random) only: the exact base weights
                                     and tokenizer as a Hugging Face model dir
    DIR/tokenizer files

and loads with::

    base = AutoModelForCausalLM.from_pretrained("DIR/base_model")   # or the hub id (model.init=pretrained)
    model = PeftModel.from_pretrained(base, "DIR")

For ``model.init=pretrained`` runs ``base_model_name_or_path`` is the hub id (``revision`` set when the run
pinned one). ``format=merged`` writes ``W0 + s·BA`` into each adapted ``nn.Linear`` and saves a plain
model: ``AutoModelForCausalLM.from_pretrained("DIR")``. Every saved model (merged, and peft's
``base_model/``) carries the tokenizer's BOS / EOS / pad ids in ``config.json`` and
``generation_config.json`` where the model's config had none (:func:`set_special_token_ids`), so plain
``generate`` stops at EOS.

``format=peft`` takes plain LoRA (``adapter.method=lora`` and the LoRA-based ``align_*``, ``meta_lora``,
``lorahub``) as is, DoRA as peft's ``use_dora=True`` (``A``, ``B``, magnitude ``m``; the same forward), and
M-LoRA converted to one LoRA: the shared ``A`` and ``s·c·Σ_i B_i`` (``c`` = 1 for ``combine=sum``, ``1/N``
for ``mean``), with R-LoRA's frozen initial-output offset appended as ``r`` more rank
(``A' = [A; A_0]``, ``B' = s·[c Σ_i B_i, −B̄_0]``, so ``B'A' = ΔW`` exactly); its ``r`` is ``2·rank``
(``rank`` without the offset) and ``lora_alpha = r`` (peft's scaling 1, ``s`` folded into ``B'``).

Task-aware runs (``mtl_lora``, ``moelora``) export ``merged`` for one task: ``task_id=`` a training task
name or its id (the index in ``task_names`` of ``adapter/adapter_config.json``) folds that task's
``ΔW_t`` into the base weights; the exported model equals the run's model on rows of that task, and
``mtlora_export.json`` records ``task_id`` and ``task_name``.

Only mergeable adapters export: ``merged`` needs every adapter layer to be mergeable (per task for the
task-aware ones), ``peft`` needs LoRA, DoRA or M-LoRA (above). Adapters that route on the token
input have no such form; load them with :func:`mtlora.trained_run.load_run`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":  # `--help` answers before torch and transformers load
    from mtlora.cli.entry import exit_if_help

    exit_if_help(sys.argv[1:], __doc__)

import torch
from safetensors.torch import save_file
from torch import nn

from mtlora.adapters import adapter_layers, find_targets, merge_adapters
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.registry import all_specs, get_spec, spec_of
from mtlora.errors import ConfigError
from mtlora.run.checksums import read_json
from mtlora.run.rundir import check_output_dir, load_resolved_config
from mtlora.trained_run import RunLoadError, check_run_dir, guard_remote_code, load_run, run_task_names
from mtlora.utils.logging import console_logging

__all__ = ["ExportError", "export_merged", "export_peft", "export_run", "main", "set_special_token_ids"]

FORMATS = ("peft", "merged")
#: the methods ``format=peft`` writes (their spec has a ``peft_form``; module doc)
PEFT_METHODS = sorted(s.name for s in all_specs() if s.peft_form is not None)
EXPORT_INFO = "mtlora_export.json"
PEFT_PREFIX = "base_model.model."
log = logging.getLogger("mtlora.export")


class ExportError(RuntimeError):
    """The run cannot be exported in the asked format (or the output dir is not usable)."""


def _check_method(run_dir: Path, method: str, fmt: str) -> None:
    """Fail before loading any weights when the run's adapter method has no form in ``fmt``."""
    spec = get_spec(method)
    if spec is None:
        raise ExportError(f"run dir {run_dir}: adapter.method={method!r} is not a known adapter method")
    cls = spec.layer_class()
    if fmt == "peft" and spec.peft_form is None:
        if cls.mergeable:
            hint = " (try format=merged)"
        elif cls.per_task_mergeable:
            hint = " (try format=merged task_id=<task>)"
        else:
            hint = "; load it with mtlora.load_run"
        raise ExportError(
            f"run dir {run_dir}: format=peft writes a peft LoRA (or DoRA), but this run's adapter is "
            f"adapter.method={method!r} ({cls.__name__}); only adapter.method in {PEFT_METHODS} exports "
            f"to peft{hint}"
        )
    if fmt == "merged" and not (cls.mergeable or cls.per_task_mergeable):
        raise ExportError(
            f"run dir {run_dir}: adapter.method={method!r} ({cls.__name__}) routes on the token input and "
            "cannot be merged into the base weights; load it with mtlora.load_run"
        )


def _resolve_task_id(run_dir: Path, cfg, task_id: int | str | None) -> tuple[int, str | None] | None:
    """``task_id`` (an id or a task name) as ``(id, name)`` for a task-aware run; None for the others.

    Raises :class:`ExportError` naming ``task_id`` when a task-aware run lacks it, when the value is not
    one of the run's tasks, or when a run that merges without one is given one."""
    method = cfg.adapter.method
    per_task = spec_of(method).layer_class().per_task_mergeable
    names = run_task_names(run_dir)
    if names is None:  # no adapter config: the config's task order (as training saves it)
        names = [str(n) for n in (cfg.data.get("select") or cfg.data.get("tasks") or [])]
    if not per_task:
        if task_id is not None:
            raise ExportError(
                f"run dir {run_dir}: task_id={task_id!r} applies only to task-aware runs (adapter.method "
                f"mtl_lora or moelora); adapter.method={method!r} merges without one: drop task_id"
            )
        return None
    if task_id is None:
        raise ExportError(
            f"run dir {run_dir}: adapter.method={method!r} keeps per-task weights, so format=merged folds "
            f"in one task's: give task_id=<task name or id> (tasks: {names})"
        )
    n = int(cfg.adapter.num_tasks)
    if isinstance(task_id, str) and task_id in names:
        return names.index(task_id), task_id
    if isinstance(task_id, str) and task_id.strip().lstrip("-").isdigit():
        task_id = int(task_id)
    if isinstance(task_id, int) and not isinstance(task_id, bool) and 0 <= task_id < n:
        return task_id, names[task_id] if len(names) == n else None
    raise ExportError(
        f"run dir {run_dir}: task_id={task_id!r} is not a task of this run; give a task name {names} or an "
        f"id in [0, {n})"
    )


def _check_out(out: Path, overwrite: bool, run_dir: Path) -> Path:
    """Fail early when ``out`` cannot be written (created later, once the run has loaded), or would replace
    a run's files: inside another run dir, inside any run's ``adapter/`` (``checkpoints/``, ...), or the
    run dir itself (:func:`mtlora.run.rundir.check_output_dir`), even with ``overwrite=true``."""
    out = Path(out)
    try:
        check_output_dir(out, own=run_dir, allow_root=False)
    except ConfigError as e:
        raise ExportError(str(e)) from e
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out={out} is not empty; pass overwrite=true to write into it")
    return out


def _check_finite(run_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write NaN or infinite weights (a diverged or damaged run), naming the tensors."""
    bad = {n: int((~torch.isfinite(t.detach())).sum()) for n, t in tensors.items() if t.is_floating_point()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        shown = ", ".join(f"{n} ({k})" for n, k in list(bad.items())[:5])
        raise ExportError(
            f"run dir {run_dir}: {sum(bad.values())} non-finite weight(s) in {len(bad)} tensor(s): {shown}; "
            "nothing was written (the run diverged or its files are damaged)"
        )


def _strip_adapters(model: nn.Module) -> nn.Module:
    """Put each adapter layer's ``base_layer`` (a plain ``nn.Linear``) back in its place, in place."""
    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if "adapter_context" in model.__dict__:
        del model.__dict__["adapter_context"]
    return model


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def set_special_token_ids(model: nn.Module, tokenizer) -> dict[str, int | list[int] | None]:
    """Give ``model.config`` and ``model.generation_config`` the tokenizer's BOS / EOS / pad ids where they
    have none, so that ``generate`` on the saved model stops at EOS and pads finished rows with the
    tokenizer's pad id. Ids a config already carries are kept (a pretrained model's own, e.g. several EOS
    ids in its generation config). Returns the ids the generation config ends up with."""
    gen = getattr(model, "generation_config", None)
    for key in SPECIAL_IDS:
        value = getattr(tokenizer, key, None)
        if value is None:
            continue
        for cfg in (model.config, gen):
            if cfg is not None and getattr(cfg, key, None) is None:
                setattr(cfg, key, int(value))
    source = gen if gen is not None else model.config
    return {key: getattr(source, key, None) for key in SPECIAL_IDS}


def _peft_target_modules(base: nn.Module, adapted: list[str]) -> list[str]:
    """The distinct last name parts of the adapted modules when they select exactly those modules (peft's
    list matching), else the full module names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if find_targets(base, suffixes) == adapted:
        return suffixes
    return sorted(adapted)


def _write_info(out: Path, run_dir: Path, fmt: str, extra: dict | None = None) -> None:
    info = {"format": fmt, "run_dir": str(run_dir.resolve()), **(extra or {})}
    source = run_dir / "base_model" / "source.json"
    if source.exists():
        info["base_fingerprint_sha256"] = read_json(source).get("fingerprint_sha256")
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def export_peft(
    run_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write the run's LoRA as a peft adapter dir (see the module doc); returns ``out``."""
    run_dir = check_run_dir(run_dir, allow_incomplete)
    cfg = guard_remote_code(load_resolved_config(run_dir), run_dir, trust_remote_code)
    _check_method(run_dir, cfg.adapter.method, "peft")
    out = _check_out(Path(out), overwrite, run_dir)
    model, tokenizer = load_run(
        run_dir, allow_incomplete=allow_incomplete, trust_remote_code=trust_remote_code
    )
    layers = adapter_layers(model)
    kinds = {type(m) for m in layers.values()}
    spec = spec_of(cfg.adapter.method)
    if spec.peft_form is None or kinds != {spec.layer_class()}:
        found = sorted(k.__name__ for k in kinds)
        raise ExportError(
            f"run dir {run_dir}: format=peft needs the layers of one method with a peft form "
            f"({PEFT_METHODS}), found {found}"
        )
    a = cfg.adapter
    rank, alpha, rslora = int(a.rank), float(a.alpha), bool(a.use_rslora)
    for name, layer in layers.items():
        if layer.rank != rank or abs(layer.scaling - lora_scaling(alpha, rank, rslora)) > 1e-12:
            raise ExportError(
                f"{name}: rank/scaling differ from adapter.rank/alpha; cannot write one LoraConfig"
            )

    weights: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, t in layer.peft_tensors().items():  # peft's key suffixes (module doc)
            weights[f"{PEFT_PREFIX}{name}.{key}"] = t.detach().float().cpu().contiguous()
    _check_finite(run_dir, weights)  # before anything is written
    dora = spec.peft_form == "dora"
    if spec.peft_form == "lora_from_heads":  # one converted LoRA: scaling folded into B' (module doc)
        ranks = {int(w.shape[0]) for k, w in weights.items() if k.endswith("lora_A.weight")}
        if len(ranks) != 1:
            raise ExportError(f"run dir {run_dir}: M-LoRA layers of different ranks {sorted(ranks)}")
        rank = ranks.pop()
        alpha, rslora, dropout = float(rank), False, 0.0  # multi-head dropout has no peft form
    else:
        dropout = float(a.dropout)
    adapted = list(layers)
    base = _strip_adapters(model)
    if cfg.model.init == "pretrained":
        base_ref, revision = cfg.model.hub_id, cfg.model.get("revision")
    else:  # config-built: ship the exact base weights next to the adapter
        base_dir = out / "base_model"
        base_dir.mkdir(parents=True, exist_ok=True)
        set_special_token_ids(base, tokenizer)
        base.save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
        base_ref, revision = str(base_dir.resolve()), None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "revision": revision,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": _peft_target_modules(base, adapted),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": dora,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    _write_info(out, run_dir, "peft", {"base_model_name_or_path": base_ref})
    return out


def _tied_adapted_weights(model: nn.Module) -> list[str]:
    """Adapted layers whose base weight is shared with another parameter (e.g. a tied ``lm_head``):
    merging into them would change the other module too."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return [n for n, m in adapter_layers(model).items() if counts.get(id(m.base_layer.weight), 0) > 1]


def export_merged(
    run_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    task_id: int | str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the run's adapters into the base weights and save a plain HF model dir; returns ``out``.

    ``task_id`` (a training task name or id) is required for task-aware runs, refused for the others."""
    run_dir = check_run_dir(run_dir, allow_incomplete)
    cfg = guard_remote_code(load_resolved_config(run_dir), run_dir, trust_remote_code)
    _check_method(run_dir, cfg.adapter.method, "merged")
    task = _resolve_task_id(run_dir, cfg, task_id)
    out = _check_out(Path(out), overwrite, run_dir)
    model, tokenizer = load_run(
        run_dir, allow_incomplete=allow_incomplete, trust_remote_code=trust_remote_code
    )
    tied = _tied_adapted_weights(model)
    if tied:
        raise ExportError(
            f"run dir {run_dir}: adapted layers {tied[:3]} share their weight with another module (tied "
            "embeddings); merging would change both. Export format=peft instead"
        )
    try:
        merge_adapters(model, task_id=None if task is None else task[0])
    except (TypeError, ValueError) as e:
        raise ExportError(f"run dir {run_dir}: {e}") from e
    merged = _strip_adapters(model)
    _check_finite(run_dir, dict(merged.named_parameters()))
    set_special_token_ids(merged, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _write_info(out, run_dir, "merged", None if task is None else {"task_id": task[0], "task_name": task[1]})
    return out


def export_run(
    run_dir: str | Path,
    format: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    task_id: int | str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Export ``run_dir`` in ``format`` (``peft`` or ``merged``) into ``out`` (default ``RUN/export/<format>``);
    ``task_id`` (``merged`` of task-aware runs): the task to merge, by name or id."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: allowed values are {list(FORMATS)}")
    out = Path(run_dir) / "export" / format if out is None else Path(out)
    if format == "merged":
        return export_merged(
            run_dir, out, overwrite, allow_incomplete, task_id=task_id, trust_remote_code=trust_remote_code
        )
    if task_id is not None:
        raise ExportError(f"task_id={task_id!r} applies only to format=merged (of task-aware runs)")
    return export_peft(
        run_dir,
        out,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
        trust_remote_code=trust_remote_code,
    )


USAGE = (
    "usage: python -m mtlora.export run_dir=RUN format=peft|merged [out=DIR] [overwrite=true] "
    "[allow_incomplete=true] [task_id=TASK (merged, task-aware runs)] [trust_remote_code=true]"
)
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv: Sequence[str]) -> dict:
    """``key=value`` arguments → keyword arguments of :func:`export_run` (raises ``ValueError``)."""
    known = {"run_dir", "format", "out", "overwrite", "allow_incomplete", "task_id", "trust_remote_code"}
    args: dict = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"unknown argument {item!r}; arguments are {sorted(known)} as key=value")
        if key in ("overwrite", "allow_incomplete", "trust_remote_code"):
            if value.lower() not in _BOOL:
                raise ValueError(f"{key}={value!r}: allowed values are true/false")
            args[key] = _BOOL[value.lower()]
        else:
            args[key] = value
    for key in ("run_dir", "format"):
        if not args.get(key):
            raise ValueError(f"{key}= is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    console_logging()
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        out = export_run(**args)
    except (ExportError, RunLoadError, ConfigError) as e:
        from mtlora.cli.entry import EXIT_USER_ERROR

        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    task = f", task_id={args['task_id']}" if args.get("task_id") is not None else ""
    log.info("exported %s (format=%s%s) to %s", args["run_dir"], args["format"], task, out)
    if args["format"] == "peft":
        info = json.loads((out / EXPORT_INFO).read_text())
        log.info(
            "load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(%r), %r)",
            info["base_model_name_or_path"],
            str(out),
        )
    else:
        log.info("load with: AutoModelForCausalLM.from_pretrained(%r)", str(out))
    return 0


if __name__ == "__main__":
    from mtlora.cli.entry import argv_value, run_main, run_model

    sys.exit(run_main(main, model=lambda: run_model(argv_value(sys.argv[1:], "run_dir"))))
