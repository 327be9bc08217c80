"""mtLoRA block-level adaptation (``docs/methods.md`` §6(a)) and the placement of mtLoRA's layers.

Instead of LoRA inside single projections, a parallel low-rank path on a whole decoder sub-block, fed with
the **post-norm** block input ``u = LN(x)`` and added to the sub-block output:

.. math::
    x' = x + F(u) + \\Delta(u), \\qquad
    \\Delta(u) = s \\sum_{i=1}^{N} \\Pi_i(u) \\odot B_i\\, \\phi(A\\, \\mathrm{drop}(u))

with ``A ∈ R^{r×d}``, ``B_i ∈ R^{d×r}`` (``d`` = hidden size), ``s = α/r`` (``α/√r`` with ``use_rslora``),
one dropout mask shared by the experts (as the block code), the router ``Π`` on the un-dropped ``u``
with fine-grained routing and the BLC (``balance_weight``, ``blc_grad``) of :mod:`mtlora.adapters.mtlora.layer`. :class:`BlockAdapter`
wraps the sub-block module itself: the decoder layer's ``mlp`` (its input is already
``post_attention_layernorm(x)``: ``out = mlp(u) + Δ(u)``) and/or its ``self_attn`` (its ``hidden_states``
is ``input_layernorm(x)``; the first item of its output tuple gets ``+ Δ(hidden_states)``); the module
names come from ``adapter.block_modules`` (``{ffn: mlp, attn: self_attn}``, matched as a suffix of the
full module name, as peft's list matching).

Styles (``adapter.block_style``) [code]:

* ``lowrank`` (default): ``φ = id``, ``A`` kaiming-uniform(a=√5), ``B_i = 0``;
* ``bottleneck``: ``φ = ReLU``, ``A`` kaiming-uniform(ReLU gain), ``B_i ~ N(0, 0.02²)`` (the output
  does **not** start equal to the base model);
* ``adaptformer``: ``φ = ReLU``, ``A`` as bottleneck, ``B_i = 0``, and a learnable per-expert scale
  ``lora_scale ∈ R^N`` (init ``adaptformer_scale_init``, 0 in the code) **instead of** ``s``. Note: with
  ``B = 0`` and scale ``0`` both get zero gradient (the path cannot leave zero, as in the released code);
  set ``adaptformer_scale_init`` > 0 (e.g. AdaptFormer's 0.1) to train it.

The router ``W_r ∈ R^{(N·g)×d}`` is kaiming-uniform(a=√5), fp32, autocast off. Not mergeable.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtlora.adapters.base import AdapterLayer, check_arg
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.inject import replace_targets
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.mtlora import DEFAULT_BLOCK_MODULES, MTLORA, PLACEMENTS
from mtlora.adapters.mtlora.routing import (
    add_balance_loss,
    combine_experts,
    group_router_probs,
    routing_groups_for,
)
from mtlora.adapters.mtlora.spectral_penalty import SpectralRegularizer
from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

BLOCK_KINDS = {"block_ffn": ("ffn",), "block_attn": ("attn",), "both": ("attn", "ffn")}


class BlockAdapter(AdapterLayer):
    """A routed low-rank path parallel to a decoder sub-block (``base_layer``, any module); see module doc."""

    method = MTLORA.name
    spec = MTLORA

    def __init__(
        self,
        block: nn.Module,
        name: str,
        context: AdapterContext,
        dim: int,
        rank: int,
        alpha: float,
        num_heads: int,
        dropout: float = 0.0,
        use_rslora: bool = False,
        block_style: str | None = None,
        routing_group_size: int | None = None,
        routing_groups: int | None = None,
        balance_weight: float | None = None,
        adaptformer_scale_init: float | None = None,
        blc_grad: bool | None = None,
    ) -> None:
        """Knobs left ``None`` take the spec's default (:mod:`mtlora.adapters.methods.mtlora`)."""
        # AdapterLayer.__init__ insists on an nn.Linear; a block adapter wraps a whole sub-block
        nn.Module.__init__(self)
        v = self.resolve_knobs(
            name,
            rank=rank,
            num_heads=num_heads,
            block_style=block_style,
            routing_group_size=routing_group_size,
            routing_groups=routing_groups,
            balance_weight=balance_weight,
            adaptformer_scale_init=adaptformer_scale_init,
            blc_grad=blc_grad,
        )
        style = v["block_style"]
        self.base_layer = block
        self.adapter_name = name
        object.__setattr__(self, "context", context)
        self.merged = False
        self.enabled = True
        self.dim = dim
        self.rank = rank
        self.num_heads = num_heads
        self.style = style
        self.groups = routing_groups_for(name, dim, v["routing_group_size"], v["routing_groups"])
        self.balance_weight = float(v["balance_weight"])
        self.blc_grad = v["blc_grad"]
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale_init = float(v["adaptformer_scale_init"])
        dev = next(block.parameters()).device
        f32 = torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, dim, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, dim, rank, device=dev, dtype=f32))
        self.lora_router = nn.Parameter(torch.empty(num_heads * self.groups, dim, device=dev, dtype=f32))
        if style == "adaptformer":
            self.lora_scale = nn.Parameter(torch.full((num_heads,), self.scale_init, device=dev, dtype=f32))
        self.reset_parameters()

    @classmethod
    def from_config(cls, block: nn.Module, name: str, context: AdapterContext, cfg: DictConfig, dim: int):
        return cls(
            block,
            name,
            context,
            dim=dim,
            rank=cfg.rank,
            alpha=cfg.alpha,
            num_heads=cfg.get("num_heads"),
            dropout=cfg.dropout,
            use_rslora=cfg.get("use_rslora", False),
            **{k: cfg.get(k) for k in cls.config_knobs() if k != "num_heads"},
        )

    @property
    def in_features(self) -> int:
        return self.dim

    @property
    def out_features(self) -> int:
        return self.dim

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        if self.style == "lowrank":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A, nonlinearity="relu")
            if self.style == "bottleneck":
                nn.init.normal_(self.lora_B, 0.0, 0.02)
            else:
                nn.init.zeros_(self.lora_B)
                self.lora_scale.fill_(self.scale_init)

    def up_heads(self) -> torch.Tensor:
        return self.lora_B

    def router_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Per-token, per-group expert weights ``(..., g, N)``, fp32 (autocast off)."""
        return group_router_probs(u, self.lora_router, self.groups)

    def delta(self, u: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.lora_dropout(u), self.lora_A.to(u.dtype))  # (..., r), one mask for all experts
        self.capture("lora_A", z)
        if self.style != "lowrank":
            z = torch.relu(z)
        pi = self.router_weights(u)
        add_balance_loss(self, pi, self.balance_weight, self.blc_grad)
        if self.style == "adaptformer":  # per-expert learnable scale instead of s
            return combine_experts(z, pi * self.lora_scale.float(), self.lora_B, per_head=False)
        return combine_experts(z, pi, self.lora_B, per_head=False) * self.scaling

    def forward(self, *args, **kwargs):
        u = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        d = self.delta(u)
        if isinstance(out, tuple):  # attention: (hidden_states, attn_weights, ...)
            return (out[0] + d.to(out[0].dtype), *out[1:])
        return out + d.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} (adapter.method=mtlora, block-level) is a routed path parallel to a whole "
            "sub-block, not a weight update of one linear layer; it cannot be merged; run the model unmerged"
        )

    def merge(self) -> None:
        self.delta_weight()  # raises: there is no single base weight to fold into

    def unmerge(self) -> None:
        return None  # never merged

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, rank={self.rank}, num_heads={self.num_heads}, style={self.style}, "
            f"scaling={self.scaling:g}, routing_groups={self.groups}, balance_weight={self.balance_weight:g}, "
            f"blc_grad={self.blc_grad}, "
            f"dropout={self.dropout_p}"
        )


def hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int):
        raise ConfigError("adapter.placement: block-level adapters need model.config.hidden_size")
    return d


def block_modules(adapter_cfg: DictConfig) -> dict[str, str]:
    given = adapter_cfg.get("block_modules") or {}
    given = OmegaConf.to_container(given) if OmegaConf.is_config(given) else dict(given)
    modules = {**DEFAULT_BLOCK_MODULES, **given}
    for kind, child in modules.items():
        ok = kind in DEFAULT_BLOCK_MODULES and isinstance(child, str) and child != ""
        check_arg("mtlora", f"block_modules.{kind}", child, ok, "a module name; keys: ffn, attn")
    return modules


def place_block_adapters(model: nn.Module, adapter_cfg: DictConfig, context: AdapterContext) -> list[str]:
    """Wrap the sub-blocks chosen by ``adapter.placement`` in :class:`BlockAdapter`; returns their names."""
    placement = adapter_cfg.placement
    modules = block_modules(adapter_cfg)
    wanted = {modules[k]: k for k in BLOCK_KINDS[placement]}
    targets = [
        n
        for n, m in model.named_modules()
        if n and not isinstance(m, AdapterLayer) and n.rsplit(".", 1)[-1] in wanted
    ]
    missing = set(wanted) - {n.rsplit(".", 1)[-1] for n in targets}
    if missing:
        kind = wanted[sorted(missing)[0]]
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            f"adapter.block_modules.{kind}={modules[kind]!r} matches no module of the model "
            f"(adapter.placement={placement}); module names available: {names}"
        )
    dim = hidden_size(model)
    log.info(
        "adapter.placement=%s: %d block adapters on %s; adapter.target_modules=%s is ignored",
        placement,
        len(targets),
        sorted(wanted),
        adapter_cfg.get("target_modules"),
    )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, child, BlockAdapter.from_config(getattr(parent, child), name, context, adapter_cfg, dim)
        )
    return targets


def place_mtlora(
    model: nn.Module, adapter_cfg: DictConfig, context: AdapterContext, component_cls
) -> list[str]:
    """Put mtLoRA into ``model`` by ``adapter.placement`` (``component``: ``component_cls`` on the
    ``target_modules`` linears; else block adapters), then register the spectral regulariser
    (``adapter.spectral``) in ``context.regularizers``. Returns the names of the adapter layers."""
    placement = adapter_cfg.get("placement", "component")
    check_arg("mtlora", "placement", placement, placement in PLACEMENTS, f"one of {PLACEMENTS}")
    reg = SpectralRegularizer.from_config(adapter_cfg.get("spectral"))  # checked before the model changes
    if placement == "component":
        names = replace_targets(model, adapter_cfg, component_cls, context)
    else:
        names = place_block_adapters(model, adapter_cfg, context)
    if reg is not None:
        reg.layers = [model.get_submodule(n) for n in names]
        context.regularizers.append(reg)
    return names
