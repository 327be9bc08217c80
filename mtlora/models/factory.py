"""Build the base model and tokenizer from a ``model=`` preset.

``model.init`` selects where the weights come from:

* ``pretrained``: ``AutoModelForCausalLM.from_pretrained(model.hub_id)`` (the real path for users).
* ``random``: a model of the preset's architecture (``model.arch``) with random weights drawn from
  ``model.init_seed``: offline, deterministic; used by the tiny default and for throughput planning.

``meta_model`` builds the same architecture on the meta device (no memory, no download) for parameter
accounting and for checking ``adapter.target_modules`` before any weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mtlora.errors import ConfigError
from mtlora.models.byte_tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer
from mtlora.models.dtypes import torch_dtype
from mtlora.utils.params import param_numel


def arch_config(model_cfg: DictConfig) -> Any:
    """A ``transformers`` config object for ``model.arch`` (model_type plus shape)."""
    if model_cfg.get("arch") is None:
        raise ConfigError(f"model.arch is not set for model {model_cfg.name!r}: needed for model.init=random")
    arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
    model_type = arch.pop("model_type")
    if model_cfg.tokenizer.kind == "bytes" and arch.get("vocab_size") is None:
        arch["vocab_size"] = BYTE_VOCAB_SIZE
    return AutoConfig.for_model(model_type, **arch)


def build_tokenizer(model_cfg: DictConfig):
    """``model.tokenizer.kind``: ``bytes`` (local, deterministic) or ``hub`` (``model.tokenizer.hub_id``)."""
    kind = model_cfg.tokenizer.kind
    if kind == "bytes":
        return build_byte_tokenizer()
    if kind == "hub":
        hub_id = model_cfg.tokenizer.get("hub_id") or model_cfg.hub_id
        tok = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=bool(model_cfg.trust_remote_code))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    raise ConfigError(f"model.tokenizer.kind={kind!r}: allowed values are ['bytes', 'hub']")


def build_model(model_cfg: DictConfig) -> PreTrainedModel:
    """Load or build the base causal LM described by ``model_cfg``."""
    dtype = torch_dtype(model_cfg.dtype)
    attn = model_cfg.attn_implementation
    if model_cfg.init == "pretrained":
        return AutoModelForCausalLM.from_pretrained(
            model_cfg.hub_id,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=bool(model_cfg.trust_remote_code),
            revision=model_cfg.get("revision"),
        )
    if model_cfg.init == "random":
        config = arch_config(model_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(model_cfg.init_seed))
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
        return model.to(dtype)
    raise ConfigError(f"model.init={model_cfg.init!r}: allowed values are ['pretrained', 'random']")


def meta_model(model_cfg: DictConfig) -> PreTrainedModel:
    """The preset's architecture on the meta device (no weights, nothing downloaded)."""
    config = arch_config(model_cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=model_cfg.attn_implementation)


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    """Total and trainable parameter counts (tied weights counted once, ZeRO-3 partitions at full size) and
    the trainable share in %."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += param_numel(p)
        if p.requires_grad:
            trainable += param_numel(p)
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}
