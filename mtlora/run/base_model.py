"""What a run dir keeps to rebuild its exact base model.

* always: the tokenizer (``tokenizer/``) and ``source.json`` (the resolved model preset: name, hub id or
  ``init=random`` with its seed, dtype; and the base parameter count);
* models up to ``MAX_SAVED_PARAMS`` parameters: a SHA-256 fingerprint of the base weights in
  ``source.json`` (``null`` above that size, where hashing every weight would cost too much);
* config-built models (``model.init=random``): ``config.json`` (the architecture), and when the model is
  small (up to ``MAX_SAVED_PARAMS``) the weights themselves as ``model.safetensors``. Larger random-init
  models are rebuilt from config + ``model.init_seed`` (:func:`mtlora.models.build_model` is deterministic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mtlora.utils.io import atomic_write, atomic_write_text
from mtlora.utils.params import param_numel

MAX_SAVED_PARAMS = 100_000_000


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Frozen (base) parameters under their original names (adapter wrappers' ``.base_layer`` removed)."""
    return {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if not p.requires_grad}


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def save_base_model(model_cfg: DictConfig, model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    params = base_parameters(model)
    n = sum(param_numel(p) for p in params.values())
    # small and whole: a ZeRO-3 partition (not gathered by the caller) can be neither hashed nor saved
    small = n <= MAX_SAVED_PARAMS and all(p.numel() == param_numel(p) for p in params.values())
    source = {
        "model": OmegaConf.to_container(model_cfg, resolve=True),
        "num_parameters": n,
        "fingerprint_sha256": fingerprint(params) if small else None,
    }
    if model_cfg.init == "random":
        model.config.to_json_file(str(out_dir / "config.json"))
        if small:
            weights = {k: v.detach().cpu().contiguous() for k, v in params.items()}
            atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))
    atomic_write_text(out_dir / "source.json", json.dumps(source, indent=2))
    return out_dir
