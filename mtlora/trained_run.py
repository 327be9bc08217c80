"""Rebuild a finished run's adapted model from its run dir: ``load_run(run_dir) -> (model, tokenizer)``.

Usage::

    from mtlora import load_run

    model, tokenizer = load_run("outputs/train/runs/<run_name>/<date_time>_local_<pid>")
    batch = tokenizer(["12+7="], return_tensors="pt")
    logits = model(**batch).logits          # eval mode, adapters active (not merged)

What it reads from the run dir (all written by ``python -m mtlora.train``):

* ``COMPLETED``: the run finished (``allow_incomplete=True`` loads a ``RUNNING``/``FAILED`` run's last
  saved adapter anyway);
* ``config_resolved.yaml``: ``model`` and ``adapter`` (the adapter is injected exactly as in training);
* ``base_model/``: the tokenizer, ``source.json`` and, for config-built models (``model.init=random``),
  ``config.json`` plus ``model.safetensors`` (the exact base weights). Without ``model.safetensors``
  (models above :data:`mtlora.run.base_model.MAX_SAVED_PARAMS`) the base is rebuilt from ``config.json``
  and ``model.init_seed``, as training built it. ``model.init=pretrained`` loads ``model.hub_id`` (at
  ``model.revision``) again;
* ``adapter/adapter_model.safetensors``: the adapter weights, checked against the SHA-256 recorded in
  ``adapter/checksums.json`` when they were saved (a damaged file is an error naming it).

Nothing in a run dir can make loading it run code: a config that sets ``trust_remote_code`` (a model
whose files ship Python code, ``auto_map``) is refused unless the caller passes ``trust_remote_code=True``
(on the command lines of evaluate / export / diagnose: ``trust_remote_code=true``), and the saved base
config and tokenizer are read with remote code off.

When ``source.json`` holds a ``fingerprint_sha256`` (models up to ``MAX_SAVED_PARAMS`` parameters), the
rebuilt base weights must hash to it, so a changed hub revision or an edited weight file is an error,
not a silently different model.

Task-aware adapters read one task id per row: call ``model.adapter_context.begin(task_ids=...)`` before
each forward (ids index ``task_names`` in ``adapter/adapter_config.json``). Plain LoRA needs nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mtlora.adapters import inject_adapters, load_adapter
from mtlora.adapters.state import ADAPTER_WEIGHTS
from mtlora.errors import ConfigError, IntegrityError
from mtlora.models.factory import build_model, torch_dtype
from mtlora.run.base_model import base_parameters, fingerprint
from mtlora.run.checksums import read_json
from mtlora.run.layout import RunLayout
from mtlora.run.rundir import MARKERS, RESOLVED_CONFIG, load_resolved_config

__all__ = [
    "RunLoadError",
    "check_run_dir",
    "guard_remote_code",
    "load_base_model",
    "load_run",
    "run_task_names",
]


class RunLoadError(RuntimeError):
    """A run dir cannot be loaded: missing files, an unfinished run, or base weights that do not match."""


def _remote_code_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys named ``trust_remote_code`` (at any depth) whose value is truthy."""
    found: list[str] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if k == "trust_remote_code" and v not in (None, False, "false", "False", 0):
            found.append(key)
        else:
            found += _remote_code_keys(v, key)
    return found


def guard_remote_code(cfg: DictConfig, run_dir: Path, trust_remote_code: bool = False) -> DictConfig:
    """``cfg`` (a run dir's saved config) with every ``trust_remote_code`` key set to ``trust_remote_code``.

    Raises :class:`RunLoadError` naming the keys when the saved config enables remote code and the caller
    did not pass ``trust_remote_code=True``: a run dir is data, and loading it never runs code from it."""
    found = _remote_code_keys(OmegaConf.to_container(cfg, resolve=False))
    if found and not trust_remote_code:
        raise RunLoadError(
            f"run dir {run_dir}: {RESOLVED_CONFIG} sets {', '.join(f'{k}=true' for k in found)}, which would "
            "import and run Python code shipped with the model or data; loading a run never enables it by "
            "itself: pass trust_remote_code=true on the command line (load_run(..., trust_remote_code=True)) "
            "only if you trust that code"
        )
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in found:
            OmegaConf.update(cfg, key, bool(trust_remote_code), merge=False)
        if cfg.get("model") is not None:
            cfg.model.trust_remote_code = bool(trust_remote_code)
    return cfg


def run_task_names(run_dir: str | Path) -> list[str] | None:
    """The run's training task names in task-id order, as saved in ``adapter/adapter_config.json`` (None
    when the run saved no adapter config or no names)."""
    path = RunLayout(run_dir).adapter_config
    names = read_json(path).get("task_names") if path.exists() else None
    return None if names is None else [str(n) for n in names]


def _status(run_dir: Path) -> str:
    for marker in sorted(MARKERS, key=lambda m: m == "RUNNING"):  # a final marker first
        path = run_dir / marker
        if path.exists():
            text = " ".join(path.read_text().split())
            return f"{marker} ({text[:300]})" if text else marker
    return "no status marker"


def check_run_dir(run_dir: str | Path, allow_incomplete: bool = False) -> Path:
    """Return ``run_dir`` as a Path after checking that it holds a finished run with every file needed.

    Raises :class:`RunLoadError` naming the run dir and what is missing or why the run is not usable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunLoadError(f"run dir {run_dir} does not exist (or is not a directory)")
    if not allow_incomplete and not (run_dir / "COMPLETED").exists():
        raise RunLoadError(
            f"run dir {run_dir} is not COMPLETED (status: {_status(run_dir)}); "
            "pass allow_incomplete=True to load its saved adapter anyway"
        )
    layout = RunLayout(run_dir)
    needed = [
        layout.resolved_config,
        layout.adapter / ADAPTER_WEIGHTS,
        layout.base_model_source,
        layout.base_model / "tokenizer",
    ]
    missing = [p.relative_to(run_dir).as_posix() for p in needed if not p.exists()]
    if missing:
        raise RunLoadError(
            f"run dir {run_dir} lacks {', '.join(missing)} (status: {_status(run_dir)}); "
            "is it a mtlora run dir, trained with train.save_adapter=true?"
        )
    return run_dir


def _load_base_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; a tied parameter may be present under one of its names."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error names no file
        raise RunLoadError(f"{path} is damaged (cannot be read: {e})") from e
    result = model.load_state_dict(state, strict=False)
    names_by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    aliases = {n: names for names in names_by_param.values() for n in names}
    missing = [k for k in result.missing_keys if not any(a in state for a in aliases.get(k, [k]))]
    if missing or result.unexpected_keys:
        raise RunLoadError(
            f"{path} does not fit the architecture of {path.parent / 'config.json'}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def load_base_model(
    run_dir: str | Path, cfg: DictConfig | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The run's base model (no adapters) on the CPU, built as described in the module doc.

    The fingerprint is not checked here (it covers the frozen parameters after adapter injection, as
    saved); :func:`load_run` checks it. ``trust_remote_code``: see :func:`guard_remote_code`."""
    run_dir = Path(run_dir)
    cfg = load_resolved_config(run_dir) if cfg is None else cfg
    cfg = guard_remote_code(cfg, run_dir, trust_remote_code)
    base_dir = RunLayout(run_dir).base_model
    model_cfg = cfg.model
    if model_cfg.init == "pretrained":
        return build_model(model_cfg)
    if model_cfg.init != "random":
        raise ConfigError(f"model.init={model_cfg.init!r}: allowed values are ['pretrained', 'random']")
    if not (base_dir / "config.json").exists():
        raise RunLoadError(f"run dir {run_dir} lacks base_model/config.json (needed for model.init=random)")
    try:
        config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=bool(trust_remote_code))
    except ValueError as e:  # e.g. an ``auto_map`` config with remote code off
        raise RunLoadError(f"run dir {run_dir}: cannot read {base_dir / 'config.json'}: {e}") from e
    with torch.random.fork_rng(devices=[]):  # same draw as mtlora.models.build_model
        torch.manual_seed(int(model_cfg.init_seed))
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=model_cfg.attn_implementation, dtype=torch.float32
        )
    model = model.to(torch_dtype(model_cfg.dtype))
    weights = base_dir / "model.safetensors"
    if weights.exists():
        _load_base_weights(model, weights)
    return model


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    allow_incomplete: bool = False,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object]:
    """The run's base model with its trained adapters injected and loaded, in eval mode, and its tokenizer.

    Raises :class:`RunLoadError` (naming ``run_dir``) when the dir is missing, the run is not
    ``COMPLETED`` (unless ``allow_incomplete``), a needed file is missing, the base weights do not match
    the saved fingerprint, the adapter weights do not fit the model, or the saved config enables remote
    code without ``trust_remote_code=True`` (:func:`guard_remote_code`).
    """
    run_dir = check_run_dir(run_dir, allow_incomplete)
    cfg = guard_remote_code(load_resolved_config(run_dir), run_dir, trust_remote_code)
    source = read_json(RunLayout(run_dir).base_model_source)
    model = load_base_model(run_dir, cfg, trust_remote_code)
    try:
        inject_adapters(model, cfg.adapter)
    except ConfigError as e:
        raise RunLoadError(f"run dir {run_dir}: cannot inject the run's adapter config: {e}") from e
    expected = source.get("fingerprint_sha256")
    if expected:
        actual = fingerprint(base_parameters(model))
        if actual != expected:
            raise RunLoadError(
                f"run dir {run_dir}: the rebuilt base model does not match the one the run trained on "
                f"(fingerprint_sha256 {actual} != {expected} in base_model/source.json); "
                "the base weight file was changed, or the hub model changed (pin model.revision)"
            )
    try:
        load_adapter(model, RunLayout(run_dir).adapter)  # checks the SHA-256 recorded when it was saved
    except (ConfigError, IntegrityError) as e:
        raise RunLoadError(f"run dir {run_dir}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(RunLayout(run_dir).base_model / "tokenizer"), trust_remote_code=bool(trust_remote_code)
        )
    except ValueError as e:  # e.g. an ``auto_map`` tokenizer with remote code off
        raise RunLoadError(f"run dir {run_dir}: cannot read base_model/tokenizer: {e}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
