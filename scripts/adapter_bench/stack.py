"""Layer-shape presets and the stack of decoder projections the adapters are injected into."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from adapter_bench.common import CONF, Skip


def load_yaml_with_defaults(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with same-group ``defaults:`` entries merged first (other groups ignored)."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        raise Skip(f"no conf/{group}/{name}.yaml")
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", None) or []
    merged = OmegaConf.create()
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            merged = OmegaConf.merge(merged, load_yaml_with_defaults(group, entry))
    return OmegaConf.merge(merged, cfg)


def shape_presets() -> list[str]:
    return sorted(
        p.stem for p in (CONF / "model").glob("*.yaml") if "arch" in load_yaml_with_defaults("model", p.stem)
    )


def layer_shape(name: str) -> dict[str, Any]:
    arch = load_yaml_with_defaults("model", name).arch
    hidden, heads = int(arch.hidden_size), int(arch.num_attention_heads)
    head_dim = hidden // heads
    return {
        "shape": name,
        "model_type": str(arch.model_type),
        "hidden": hidden,
        "intermediate": int(arch.intermediate_size),
        "heads": heads,
        "kv_heads": int(arch.num_key_value_heads),
        "head_dim": head_dim,
    }


class _Attn(nn.Module):
    def __init__(self, s: dict[str, Any], bias: bool) -> None:
        super().__init__()
        d, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.groups, self.head_dim = s["heads"] // s["kv_heads"], s["head_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.k_proj(x) * self.v_proj(x)
        kv = kv.unflatten(-1, (-1, self.head_dim)).repeat_interleave(self.groups, dim=-2).flatten(-2)
        return self.o_proj(self.q_proj(x) + kv)


class _Mlp(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        d, f = s["hidden"], s["intermediate"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        self.self_attn = _Attn(s, bias=s["model_type"] == "qwen2")
        self.mlp = _Mlp(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(x)
        return h + self.mlp(h)


class LinearStack(nn.Module):
    """``layers`` decoder layers reduced to their seven projections (module names as in HF Qwen2/LLaMA)."""

    def __init__(self, shape: dict[str, Any], layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(shape) for _ in range(layers))
        # what block-level adapters (mtLoRA) read from a HF model
        self.config = SimpleNamespace(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_stack(
    shape: dict[str, Any], layers: int, device: str | torch.device, dtype: torch.dtype
) -> LinearStack:
    with torch.device(device):
        stack = LinearStack(shape, layers)
    stack = stack.to(dtype)
    stack.requires_grad_(False)
    return stack


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
