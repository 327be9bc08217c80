"""The LoraHub library: which finished LoRA runs are composed, checks that they fit the composition, and
their stacked weights.

Every library run is a finished ``adapter.method=lora`` run of the composition's base model with its rank,
alpha, ``use_rslora`` and target modules; the checks load no weights (:func:`preflight_lorahub`, run before
the run dir is claimed).
"""

from __future__ import annotations

import glob
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file

from mtlora.adapters import adapter_layers, adapter_state_dict
from mtlora.adapters.lora import LoraLinear
from mtlora.adapters.state import ADAPTER_WEIGHTS
from mtlora.errors import ConfigError
from mtlora.run.checksums import read_json
from mtlora.run.layout import RunLayout
from mtlora.run.rundir import load_resolved_config

#: adapter keys every library run must share with the composition (they fix the LoRA's shape and scale)
ADAPTER_KEYS = ("rank", "alpha", "use_rslora", "target_modules")
#: model keys that do not change the base weights (not compared)
MODEL_KEYS_IGNORED = ("default_lr", "max_seq_len")
#: ``adapter.ce_norm``: divide the few-shot CE by the number of few-shot rows (the code) or not
CE_NORMS = ("n_examples", "none")
#: ``adapter.result``: the weights that are loaded and saved
RESULTS = ("recommendation", "best_evaluated")


# ---------------------------------------------------------------------------------------------- config


def check_lorahub_config(cfg: DictConfig) -> None:
    """The lorahub keys of ``cfg.adapter`` and the single-process requirement (raises :class:`ConfigError`)."""
    from mtlora.utils.dist import launched_as_worker

    a, errors = cfg.adapter, []

    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def is_num(v, lo, open_=False):
        return isinstance(v, int | float) and not isinstance(v, bool) and (v > lo if open_ else v >= lo)

    if not is_int(a.get("budget"), 1):
        errors.append(f"adapter.budget={a.get('budget')!r}: must be an integer >= 1")
    if not is_num(a.get("weight_bound"), 0, open_=True):
        errors.append(f"adapter.weight_bound={a.get('weight_bound')!r}: must be a number > 0")
    if not is_num(a.get("l1"), 0):
        errors.append(f"adapter.l1={a.get('l1')!r}: must be a number >= 0")
    if not is_int(a.get("fewshot_per_task"), 1):
        errors.append(f"adapter.fewshot_per_task={a.get('fewshot_per_task')!r}: must be an integer >= 1")
    if a.get("num_modules") is not None and not is_int(a.get("num_modules"), 1):
        errors.append(f"adapter.num_modules={a.get('num_modules')!r}: must be an integer >= 1 or null")
    if not isinstance(a.get("optimizer"), str):
        errors.append(f"adapter.optimizer={a.get('optimizer')!r}: must be a Nevergrad optimizer name")
    if a.get("ce_norm", "n_examples") not in CE_NORMS:
        errors.append(f"adapter.ce_norm={a.get('ce_norm')!r}: must be one of {list(CE_NORMS)}")
    if a.get("result", "recommendation") not in RESULTS:
        errors.append(f"adapter.result={a.get('result')!r}: must be one of {list(RESULTS)}")
    lib = a.get("library")
    if lib is not None and not isinstance(lib, ListConfig | list):
        errors.append(f"adapter.library={lib!r}: must be a list of run dirs")
    if not lib and not a.get("library_glob"):
        errors.append("adapter.library / adapter.library_glob: give the LoRA run dirs to compose")
    if cfg.hardware.get("launcher", "none") != "none" or launched_as_worker():
        errors.append(
            f"hardware.launcher={cfg.hardware.get('launcher')!r}: adapter=lorahub runs in one process "
            "(use hardware=cpu, or hardware.device=cuda)"
        )
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def resolve_library(adapter_cfg: DictConfig) -> list[Path]:
    """``adapter.library`` in its order, then the directories matched by ``adapter.library_glob`` (sorted);
    duplicates dropped. Relative paths are relative to the working directory."""
    dirs = [Path(str(p)) for p in (adapter_cfg.get("library") or [])]
    pattern = adapter_cfg.get("library_glob")
    if pattern:
        matched = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_dir())
        if not matched:
            raise ConfigError(f"adapter.library_glob={pattern!r} matches no directory")
        dirs += matched
    out: list[Path] = []
    for d in dirs:
        if d.resolve() not in {o.resolve() for o in out}:
            out.append(d)
    if not out:
        raise ConfigError("adapter.library / adapter.library_glob: no LoRA run dir to compose")
    return out


def sample_modules(dirs: Sequence[Path], num_modules: int | None, seed: int) -> list[Path]:
    """All ``dirs`` when ``num_modules`` is null (or >= their number), else a seeded sample of that many
    (kept in library order)."""
    if num_modules is None or num_modules >= len(dirs):
        if num_modules is not None and num_modules > len(dirs):
            raise ConfigError(
                f"adapter.num_modules={num_modules}: the library holds only {len(dirs)} run dirs"
            )
        return list(dirs)
    picked = sorted(random.Random(seed).sample(range(len(dirs)), num_modules))
    return [dirs[i] for i in picked]


def _flat(d, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def check_library_run(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Check that ``run_dir`` is a finished plain-LoRA run whose base model and LoRA shape match ``cfg``;
    returns its resolved config. Errors name the run dir and the first mismatching key."""
    from mtlora.trained_run import RunLoadError, check_run_dir

    try:
        check_run_dir(run_dir)
    except RunLoadError as e:
        raise ConfigError(f"LoraHub library: {e}") from e
    lib = load_resolved_config(run_dir)
    where = f"LoraHub library run {run_dir}"
    if lib.adapter.get("method") != "lora":
        raise ConfigError(
            f"{where}: adapter.method={lib.adapter.get('method')!r}, but LoraHub composes plain LoRAs "
            "(adapter.method='lora')"
        )
    for key in ADAPTER_KEYS:
        mine, theirs = cfg.adapter.get(key), lib.adapter.get(key)
        if isinstance(mine, ListConfig):
            mine = list(mine)
        if isinstance(theirs, ListConfig):
            theirs = list(theirs)
        if mine != theirs:
            raise ConfigError(
                f"{where}: adapter.{key}={theirs!r}, but this composition has adapter.{key}={mine!r}; "
                f"every library LoRA must have the composition's rank, alpha, use_rslora and target "
                f"modules (set adapter.{key}=... to match)"
            )
    mine = _flat(OmegaConf.to_container(cfg.model, resolve=True), "model")
    theirs = _flat(OmegaConf.to_container(lib.model, resolve=True), "model")
    for key in sorted(set(mine) | set(theirs)):
        if key.split(".", 1)[1] in MODEL_KEYS_IGNORED:
            continue
        if mine.get(key) != theirs.get(key):
            raise ConfigError(
                f"{where}: {key}={theirs.get(key)!r}, but this composition has {key}={mine.get(key)!r}; "
                "the library LoRAs must share the composition's base model (pass the same model=...)"
            )
    return lib


def preflight_lorahub(cfg: DictConfig) -> list[Path]:
    """Config and library checks that load no weights; returns the library run dirs."""
    check_lorahub_config(cfg)
    dirs = resolve_library(cfg.adapter)
    for d in dirs:
        check_library_run(cfg, d)
    return dirs


def load_library_weights(model: torch.nn.Module, dirs: Sequence[Path]) -> dict[str, tuple]:
    """Per LoRA layer of ``model``: the stacked ``(A_stack, B_stack)`` of the library runs (same order as
    ``dirs``), on the layer's device. The weight keys and shapes must equal the model's."""
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, LoraLinear)}
    expected = adapter_state_dict(model)
    states = []
    for d in dirs:
        state = load_file(str(RunLayout(d).adapter / ADAPTER_WEIGHTS))
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"LoraHub library run {d}: adapter weights do not fit the composition's LoRA layers: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ConfigError(
                    f"LoraHub library run {d}: adapter weight {k} has shape {tuple(v.shape)}, "
                    f"the composition's LoRA expects {tuple(expected[k].shape)}"
                )
        states.append(state)
    out = {}
    for name, layer in layers.items():
        dev = layer.lora_A.device
        a = torch.stack([s[f"{name}.lora_A"] for s in states]).to(dev, torch.float32)
        b = torch.stack([s[f"{name}.lora_B"] for s in states]).to(dev, torch.float32)
        out[name] = (a, b)
    return out


def check_base_fingerprints(modules: Sequence[Path], fingerprint: str) -> None:
    """Every library run's recorded base-model fingerprint (``base_model/source.json``) equals the
    composition's ``fingerprint`` (runs that recorded none are not compared)."""
    for d in modules:
        source = RunLayout(d).base_model_source
        theirs = read_json(source).get("fingerprint_sha256")
        if theirs and theirs != fingerprint:
            raise ConfigError(
                f"LoraHub library run {d}: base_model/source.json fingerprint_sha256={theirs} differs from "
                f"the composition's base model ({fingerprint}): not the same base weights"
            )
