"""Adapter weights as a state dict, safetensors files, and merge/unmerge over a whole model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtlora.adapters.base import adapter_layers
from mtlora.errors import ConfigError
from mtlora.run.checksums import verify, write_manifest
from mtlora.utils.io import atomic_write, atomic_write_text

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent buffers owned by the adapter layers themselves (not their ``base_layer``), by full name.

    They hold adapter state that is not trained but is part of the adapter, e.g. R-LoRA's frozen
    initial-output offset (:mod:`mtlora.adapters.multihead`); plain LoRA has none."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for bname, b in layer.named_buffers(recurse=False):
            if bname not in layer._non_persistent_buffers_set:
                out[f"{name}.{bname}"] = b
    return out


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**{n: p for n, p in model.named_parameters() if p.requires_grad}, **adapter_buffers(model)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters of ``model`` and the adapter layers' own persistent buffers,
    by full name, detached, contiguous, on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in _adapter_tensors(model).items()}


def check_adapter_fits(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise a :class:`ConfigError` unless ``shapes`` (name -> shape of saved adapter tensors) has exactly the
    adapter tensors of ``model`` with their shapes (a ZeRO-3 partition by its full ``ds_shape``)."""
    params = _adapter_tensors(model)
    missing, unexpected = set(params) - set(shapes), set(shapes) - set(params)
    if missing or unexpected:
        raise ConfigError(
            f"adapter weights do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it trained with another adapter/model config?)"
        )
    for n, p in params.items():
        have = tuple(getattr(p, "ds_shape", p.shape))
        if have != tuple(shapes[n]):
            raise ConfigError(f"adapter weight {n}: shape {tuple(shapes[n])} != model {have}")


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the adapter parameters (and adapter buffers) of ``model``; the key sets and
    shapes must be equal (:func:`check_adapter_fits`)."""
    check_adapter_fits(model, {k: v.shape for k, v in state.items()})
    with torch.no_grad():
        for n, p in _adapter_tensors(model).items():
            p.copy_(state[n].to(p.dtype))


def save_adapter(model: nn.Module, out_dir: Path, adapter_cfg: dict[str, Any]) -> Path:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and their SHA-256 (``checksums.json``,
    :mod:`mtlora.run.checksums`) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    atomic_write(
        out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "mtlora"})
    )
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(adapter_cfg, indent=2))
    write_manifest(out_dir)
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Load ``adapter_dir``'s weights into ``model`` after checking their recorded SHA-256; raises
    :class:`~mtlora.errors.IntegrityError` naming a damaged file."""
    verify(adapter_dir)
    load_adapter_state_dict(model, load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)))


def merge_adapters(model: nn.Module, task_id: int | None = None) -> None:
    """Fold every adapter into its base weight; all or nothing (raises before changing any weight).

    Task-aware adapters (MTL-LoRA, MOELoRA: ``per_task_mergeable``) keep per-task weights and merge for
    one task only: pass ``task_id`` (an int in ``[0, num_tasks)``), and they fold in ``ΔW_t``; the merged
    model then serves rows of that task (no task ids needed). Raises ``TypeError`` for adapters that cannot
    merge (token routing) or for task-aware ones without ``task_id``, ``ValueError`` for a ``task_id`` that
    is out of range or given to a model without task-aware adapters."""
    layers = adapter_layers(model)
    per_task = sorted({type(m).__name__ for m in layers.values() if m.per_task_mergeable})
    blocked = sorted({type(m).__name__ for m in layers.values() if not (m.mergeable or m.per_task_mergeable)})
    if blocked:
        raise TypeError(
            f"adapters {blocked} cannot be merged into one weight (they route per token); run the model "
            "unmerged"
        )
    if per_task and task_id is None:
        raise TypeError(
            f"adapters {per_task} keep per-task weights and cannot be merged for all tasks at once; merge "
            "them for one task with merge_adapters(model, task_id=t)"
        )
    if task_id is not None and not per_task:
        raise ValueError(
            f"task_id={task_id!r}: only task-aware adapters (mtl_lora, moelora) merge per task; this "
            "model's adapters merge without one"
        )
    for name, layer in layers.items():  # checked on every layer before any weight changes
        if layer.per_task_mergeable:
            layer._task_id(task_id)
            if layer.merged and layer.merged_task != task_id:
                raise ValueError(
                    f"{name} is merged for task {layer.merged_task}; unmerge_adapters(model) before "
                    f"merging task {task_id}"
                )
    for layer in layers.values():
        if layer.per_task_mergeable:
            layer.merge(task_id)
        else:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter out of its base weight again (per-task merges included)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
