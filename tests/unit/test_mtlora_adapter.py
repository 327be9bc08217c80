"""mtLoRA (docs/methods.md §6): the component layer with fine-grained routing (FGR) and BLC, block-level
adapters on the tiny model (checked with hooks), placement/injection, parameter counts of the paper,
save/load, merge refusal, bf16, config errors.

Expected values are computed here with explicit loops over experts, groups and tokens (or NumPy),
independently of the layers' batched einsum code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from mtlora.adapters import (
    BlockAdapter,
    HydraLoraLinear,
    MtLoraLinear,
    SpectralRegularizer,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.mtlora.routing import combine_experts
from mtlora.config import validate_config
from mtlora.count import count
from mtlora.errors import ConfigError
from mtlora.models import build_model
from tests.helpers.compose import compose_train
from tests.helpers.tiny import logits, tokens

D_IN, D_OUT, RANK, HEADS, ALPHA = 16, 12, 4, 3, 8.0


def make(seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT, **kw) -> tuple[MtLoraLinear, nn.Linear]:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True)
    args = {"rank": RANK, "alpha": ALPHA, "num_heads": HEADS, **kw}
    return MtLoraLinear(base, "blocks.0.up_proj", AdapterContext(), **args), base


def randomise(layer: nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    """Move every adapter tensor away from its init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora_"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if n == "lora_B" else 1.0) * scale)


def reference_delta(
    x, a, b, router, groups: int, scaling, relu: bool = False, expert_scale=None, x_for_a=None
):
    """s Σ_i Π_i(x) ⊙ B_i φ(A x_i), token by token, expert by expert, group by group (float64). The router
    reads ``x``; ``A`` reads ``x_for_a`` (the dropped input: ``(..., d_in)`` shared by the experts or
    ``(..., N, d_in)`` one per expert; default ``x``)."""
    x, a, b, router = (t.detach().double() for t in (x, a, b, router))
    n, d_out, _ = b.shape
    gs = d_out // groups
    flat = x.reshape(-1, x.shape[-1])
    xa = flat if x_for_a is None else x_for_a.detach().double().reshape(flat.shape[0], -1, x.shape[-1])
    out = torch.zeros(flat.shape[0], d_out, dtype=torch.float64)
    for t in range(flat.shape[0]):
        logits = router @ flat[t]  # (N·g,), logit k·N + i = group k, expert i
        for k in range(groups):
            lk = logits[k * n : (k + 1) * n]
            p = torch.exp(lk - lk.max())
            p = p / p.sum()
            for i in range(n):
                z = a @ (xa[t] if xa.dim() == 2 else xa[t, i if xa.shape[1] > 1 else 0])
                if relu:
                    z = torch.relu(z)
                c = p[i] * (1.0 if expert_scale is None else float(expert_scale[i].detach()))
                out[t, k * gs : (k + 1) * gs] += c * (b[i] @ z)[k * gs : (k + 1) * gs]
    if scaling is not None:
        out = out * scaling
    return out.reshape(*x.shape[:-1], d_out)


# ---------------------------------------------------------------- component layer


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_component_forward_matches_per_expert_per_group_reference(groups: int) -> None:
    layer, base = make(routing_groups=groups)
    randomise(layer)
    assert layer.lora_router.shape == (HEADS * groups, D_IN)
    layer.eval()
    x = torch.randn(2, 5, D_IN)
    expected = base(x).double() + reference_delta(
        x, layer.lora_A, layer.lora_B, layer.lora_router, groups, layer.scaling
    )
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_routing_group_size_is_the_codes_knob_and_wins() -> None:
    layer, _ = make(routing_group_size=3, routing_groups=2)  # d_out 12 / 3 = 4 groups
    assert layer.groups == 4 and layer.lora_router.shape == (HEADS * 4, D_IN)
    assert make(routing_group_size=D_OUT)[0].groups == 1


def test_combine_experts_per_head_inputs_match_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, HEADS, RANK, generator=g)  # one z per expert (per-head dropout)
    pi = torch.softmax(torch.randn(2, 3, 2, HEADS, generator=g), -1)
    b = torch.randn(HEADS, D_OUT, RANK, generator=g)
    expected = torch.zeros(2, 3, D_OUT)
    for i in range(HEADS):
        weight = pi[..., i].repeat_interleave(D_OUT // 2, dim=-1)
        expected += weight * (z[..., i, :] @ b[i].T)
    torch.testing.assert_close(combine_experts(z, pi, b, per_head=True), expected, atol=1e-5, rtol=1e-5)


def test_one_group_equals_hydralora() -> None:
    mt, base = make(routing_groups=1, dropout_place="input_shared")
    hydra = HydraLoraLinear(base, "h", AdapterContext(), RANK, ALPHA, HEADS, dropout_place="input_shared")
    randomise(mt)
    hydra.load_state_dict(mt.state_dict())
    mt.eval(), hydra.eval()
    x = torch.randn(3, 4, D_IN)
    # HydraLoRA's equation: W0 x + b + s Σ_i softmax(W_r x)_i B_i A x
    w = torch.softmax(x @ mt.lora_router.detach().T, -1)
    eq = base(x) + mt.scaling * sum(
        w[..., i : i + 1] * (x @ mt.lora_A.detach().T @ mt.lora_B[i].detach().T) for i in range(HEADS)
    )
    torch.testing.assert_close(mt(x), hydra(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mt(x), eq, atol=1e-5, rtol=1e-5)


def _replayed_mask(seed: int, shape, p: float) -> torch.Tensor:
    """The inverted-dropout mask (0 or 1/(1-p)) that the first dropout call after ``manual_seed(seed)`` draws."""
    torch.manual_seed(seed)
    return torch.nn.functional.dropout(torch.ones(shape), p=p, training=True)


def test_fgr_component_dropout_is_one_mask_shared_by_all_experts_as_the_code() -> None:
    """The released FGR branch applies lora_dropout once to x, before A: one mask for all experts."""
    p = 0.5
    layer, base = make(routing_groups=2, dropout=p)  # dropout_place left at its default
    assert layer.dropout_place == "input_shared"
    randomise(layer)
    x = torch.randn(2, 5, D_IN)
    layer.train()
    torch.manual_seed(7)
    out = layer(x).double()
    shared = _replayed_mask(7, x.shape, p)
    args = (x, layer.lora_A, layer.lora_B, layer.lora_router, 2, layer.scaling)
    expected = base(x).double() + reference_delta(*args, x_for_a=x * shared)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    clean = base(x).double() + reference_delta(*args)
    assert (out - clean).abs().max() > 1e-2  # the mask acts

    # the other knob: one mask per expert (dropout_place=input_per_head), replayed the same way
    per, _ = make(routing_groups=2, dropout=p, dropout_place="input_per_head")
    per.load_state_dict(layer.state_dict())
    per.train()
    torch.manual_seed(7)
    out_per = per(x).double()
    masks = _replayed_mask(7, (2, 5, HEADS, D_IN), p)
    expected_per = base(x).double() + reference_delta(*args, x_for_a=x.unsqueeze(-2) * masks)
    torch.testing.assert_close(out_per, expected_per, atol=1e-5, rtol=1e-5)
    assert (out_per - out).abs().max() > 1e-2


def test_component_dropout_default_follows_fine_grained_routing() -> None:
    assert make(routing_groups=1)[0].dropout_place == "input_per_head"  # no FGR: HydraLoRA's masks
    assert make(routing_groups=4)[0].dropout_place == "input_shared"
    assert make(routing_group_size=D_OUT)[0].dropout_place == "input_shared"  # FGR on with one group
    assert make(routing_groups=2, dropout_place="input_per_head")[0].dropout_place == "input_per_head"
    for preset, place in [
        ("adapter=mtlora_component", "input_shared"),
        ("experiment=mtlora/ablation/hydralora_qv_bbh", "input_per_head"),
        ("experiment=mtlora/ablation/hydralora_qv_mmlu", "input_per_head"),
    ]:
        acfg = compose_train([preset]).adapter
        layer = MtLoraLinear.from_config(nn.Linear(D_IN, 16), "x", AdapterContext(), acfg)
        assert layer.dropout_place == place, preset
    # null passes the config check for mtLoRA only; a bad value names the key
    validate_config(compose_train(["adapter=mtlora_component", "adapter.dropout_place=null"]))
    for overrides in (
        ["adapter=mtlora", "adapter.dropout_place=output"],
        ["adapter=hydralora", "adapter.dropout_place=null"],
    ):
        with pytest.raises(ConfigError, match="adapter.dropout_place"):
            validate_config(compose_train(overrides))


def test_zero_b_init_leaves_base_output_unchanged() -> None:
    layer, base = make(routing_groups=2)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(2, 3, D_IN)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_balance_loss_is_cv_squared_of_mean_routing_probability() -> None:
    layer, _ = make(routing_groups=2, balance_weight=0.3)
    layer.context.num_layers = 4
    randomise(layer)
    x = torch.randn(2, 5, D_IN)
    layer.train()
    layer(x)
    key = "blocks.0.up_proj.balance"
    assert set(layer.context.aux_losses) == {key}
    # independent: NumPy softmax per (token, group), mean over tokens and groups, unbiased variance
    logits = (x.reshape(-1, D_IN).numpy().astype(np.float64) @ layer.lora_router.detach().numpy().T).reshape(
        -1, 2, HEADS
    )
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_bar = p.reshape(-1, HEADS).mean(0)
    cv2 = p_bar.var(ddof=1) / (p_bar.mean() ** 2 + 1e-10)
    assert float(layer.context.aux_losses[key].detach()) == pytest.approx(0.3 * cv2 / 4, rel=1e-5)
    assert cv2 > 1e-4  # a non-trivial value is checked
    # eval mode: no balance loss (as the code); balance_weight=0: none either
    layer.context.aux_losses.clear()
    layer.eval()
    layer(x)
    assert not layer.context.aux_losses
    off, _ = make(balance_weight=0.0)
    off.train()
    off(x)
    assert not off.context.aux_losses


def _reference_balance_grad(x: torch.Tensor, router: torch.Tensor, groups: int, alpha: float, layers: int):
    """(value, ∇_router) of alpha · cv²(p̄) / L in float64: softmax over experts per (token, group),
    p̄ = mean over tokens and groups, cv² = unbiased variance / (mean² + 1e-10)."""
    r = router.detach().double().clone().requires_grad_(True)
    logits = (x.reshape(-1, x.shape[-1]).double() @ r.T).reshape(-1, groups, r.shape[0] // groups)
    p_bar = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1]).mean(0)
    value = alpha * p_bar.var(unbiased=True) / (p_bar.mean() ** 2 + 1e-10) / layers
    value.backward()
    return float(value.detach()), r.grad


def _component(blc_grad: bool):
    layer, _ = make(routing_groups=2, balance_weight=0.3, blc_grad=blc_grad)
    return layer


def _block(blc_grad: bool):
    torch.manual_seed(0)
    return BlockAdapter(
        nn.Linear(D_IN, D_IN), "blocks.0.mlp", AdapterContext(), dim=D_IN, rank=RANK, alpha=ALPHA,
        num_heads=HEADS, routing_groups=2, balance_weight=0.3, blc_grad=blc_grad,
    )  # fmt: skip


@pytest.mark.parametrize("build", [_component, _block], ids=["component", "block"])
@pytest.mark.parametrize("blc_grad", [False, True])
def test_blc_grad_decides_whether_the_balance_loss_reaches_the_router(build, blc_grad: bool) -> None:
    """blc_grad=false (the released scripts' effective BLC under reentrant checkpointing): the balance value
    is there but the router's gradient is that of the task loss alone; true: plus ∇ of the BLC."""
    layer = build(blc_grad)
    layer.context.num_layers = 4
    randomise(layer)
    x = torch.randn(2, 5, D_IN)

    def router_grad(train: bool) -> torch.Tensor:
        layer.train(train)
        layer.zero_grad()
        layer.context.begin()
        out = layer(x)
        loss = 1e-3 * out.square().mean()  # small, so that fp32 round-off of the difference stays small
        aux = layer.context.total_aux_loss()
        assert (aux is not None) == train
        (loss if aux is None else loss + aux).backward()
        return layer.lora_router.grad.clone()

    with_blc = router_grad(train=True)  # dropout is 0: train and eval forwards are the same
    task_only = router_grad(train=False)
    value, expected = _reference_balance_grad(x, layer.lora_router, 2, 0.3, 4)
    layer.train()
    layer.context.begin()
    layer(x)
    (aux,) = layer.context.aux_losses.values()
    assert float(aux.detach()) == pytest.approx(value, rel=1e-5) and value > 1e-4  # computed in both cases
    assert aux.requires_grad == blc_grad
    assert float(expected.abs().max()) > 1e-4 and float(task_only.abs().max()) > 1e-4
    if blc_grad:
        torch.testing.assert_close((with_blc - task_only).double(), expected, rtol=1e-4, atol=1e-7)
    else:
        assert torch.equal(with_blc, task_only)


def test_paper_presets_run_the_codes_inert_blc_and_spectral_step_weight() -> None:
    """Every mtLoRA preset: blc_grad=false [code]; spectral step weight λ/GA equal to the scripts' (BBH λ 1.0 at
    GA 2 every 500 steps, Dolly->MMLU λ 0.5 at GA 1 every 280 steps); the method default keeps the BLC active."""
    assert compose_train(["adapter=mtlora"]).adapter.blc_grad is True
    root = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "mtlora"
    seen = 0
    for f in sorted(root.glob("*/*.yaml")):
        cfg = compose_train([f"experiment=mtlora/{f.parent.name}/{f.stem}"])
        if cfg.adapter.method != "mtlora":
            continue
        seen += 1
        assert cfg.adapter.blc_grad is False, f
        spec = cfg.adapter.spectral
        if spec.mode == "none":
            continue
        script = (1.0, 2, 500) if f.stem.endswith("bbh") else (0.5, 1, 280)
        ga = cfg.train.gradient_accumulation_steps
        assert spec["lambda"] / ga == pytest.approx(script[0] / script[1]), f
        assert spec.every_steps == script[2], f
        assert cfg.train.micro_batch_size * ga == 32, f  # the scripts' 32 rows per step: same firing steps
    assert seen == 12


def test_router_is_fp32_and_sums_to_one_per_group_for_bf16_inputs() -> None:
    layer, _ = make(routing_groups=2)
    randomise(layer)
    x = torch.randn(2, 3, D_IN, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.router_weights(x)
    assert w.dtype == torch.float32 and w.shape == (2, 3, 2, HEADS)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 2))
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if n.startswith("lora_"))


def test_merge_raises_type_error() -> None:
    layer, _ = make()
    with pytest.raises(TypeError, match="router"):
        layer.merge()
    assert not layer.merged


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("place", ["input_shared", "input_per_head"])
def test_expert_computation_does_not_grow_with_the_expert_count(place: str) -> None:
    calls = []
    for heads in (2, 8):
        layer, _ = make(num_heads=heads, routing_groups=2, dropout=0.1, dropout_place=place)
        layer.train()
        with _CountCalls() as c:
            layer(torch.randn(2, 3, D_IN))
        calls.append(c.calls)
    assert calls[0] == calls[1]


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"routing_group_size": 5}, "adapter.routing_group_size"),
        ({"routing_groups": 5}, "adapter.routing_groups"),
        ({"routing_groups": 0}, "adapter.routing_groups"),
        ({"balance_weight": -1.0}, "adapter.balance_weight"),
        ({"init": "rlora"}, "adapter.init"),
        ({"num_heads": 0}, "adapter.num_heads"),
    ],
)
def test_component_config_errors_name_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make(**kw)


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def cfg():
    return compose_train(["debug=smoke", "adapter=mtlora"])


def fresh(cfg, **overrides):
    model = build_model(cfg.model)
    acfg = cfg.adapter.copy()
    for k, v in overrides.items():
        OmegaConf.update(acfg, k, v, merge=False)
    return model, acfg


def test_default_config_is_the_papers_main_setting(cfg) -> None:
    a = cfg.adapter
    assert (a.placement, a.block_style, a.routing_groups, a.balance_weight) == (
        "block_ffn",
        "lowrank",
        2,
        0.01,
    )
    assert (a.rank, a.alpha, a.num_heads, a.dropout) == (16, 64, 16, 0.05)
    assert (a.spectral.mode, a.spectral["lambda"], a.spectral.every_steps) == ("self_gram", 1.0, 500)


@pytest.mark.parametrize(
    ("placement", "kinds"),
    [("block_ffn", {"mlp"}), ("block_attn", {"self_attn"}), ("both", {"mlp", "self_attn"})],
)
def test_block_placement_wraps_sub_blocks_and_ignores_target_modules(cfg, placement, kinds, caplog) -> None:
    model, acfg = fresh(cfg, placement=placement, target_modules=["nothing_matches"])
    with caplog.at_level("INFO", logger="mtlora.adapters.mtlora.block"):
        ctx = inject_adapters(model, acfg)
    assert "target_modules" in caplog.text and "ignored" in caplog.text
    layers = adapter_layers(model)
    assert all(isinstance(m, BlockAdapter) for m in layers.values())
    assert {n.rsplit(".", 1)[-1] for n in layers} == kinds
    assert len(layers) == 2 * len(kinds) == ctx.num_layers
    # only adapter parameters train; every base parameter (inside the blocks too) is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in {"lora_A", "lora_B", "lora_router"} for n in trainable)
    assert len(trainable) == 3 * len(layers)
    assert not any(p.requires_grad for m in layers.values() for p in m.base_layer.parameters())
    assert [type(r) for r in ctx.regularizers] == [SpectralRegularizer]


def test_component_placement_uses_target_modules(cfg) -> None:
    model, acfg = fresh(cfg, placement="component")
    ctx = inject_adapters(model, acfg)
    layers = adapter_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}
    assert all(type(m) is MtLoraLinear for m in layers.values()) and ctx.num_layers == 4
    assert len(ctx.regularizers) == 1


def test_spectral_off_registers_no_regulariser(cfg) -> None:
    for spec in ({"mode": "none"}, {"mode": "self_gram", "lambda": 0.0}, None):
        model, acfg = fresh(cfg, spectral=spec)
        assert inject_adapters(model, acfg).regularizers == []


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"placement": "everywhere"}, "adapter.placement"),
        ({"block_style": "fancy"}, "adapter.block_style"),
        ({"block_modules": {"ffn": "feed_forward"}}, "adapter.block_modules.ffn"),
        ({"spectral": {"mode": "fro"}}, "adapter.spectral.mode"),
        ({"spectral": {"mode": "self_gram", "every_steps": 0}}, "adapter.spectral.every_steps"),
        ({"routing_group_size": 7}, "adapter.routing_group_size"),
    ],
)
def test_placement_config_errors_leave_the_model_untouched(cfg, overrides: dict, key: str) -> None:
    model, acfg = fresh(cfg, **overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        inject_adapters(model, acfg)
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def _hooked_block_check(model, kind: str, groups: int, style: str = "lowrank") -> None:
    """For each adapted sub-block: adapter output == base sub-block output + Δ(post-norm input)."""
    seen: dict[str, dict] = {}
    handles = []
    for name, layer in adapter_layers(model).items():
        rec = seen.setdefault(name, {})
        decoder = model.get_submodule(name.rpartition(".")[0])
        norm = decoder.post_attention_layernorm if kind == "mlp" else decoder.input_layernorm
        handles.append(norm.register_forward_hook(lambda m, i, o, rec=rec: rec.__setitem__("norm", o)))
        handles.append(
            layer.base_layer.register_forward_hook(
                lambda m, a, k, o, rec=rec: rec.__setitem__("base", o), with_kwargs=True
            )
        )
        handles.append(layer.register_forward_hook(lambda m, i, o, rec=rec: rec.__setitem__("out", o)))
    logits(model, tokens(length=10))
    for h in handles:
        h.remove()
    assert len(seen) == 2
    for name, rec in seen.items():
        layer = adapter_layers(model)[name]
        base, out = rec["base"], rec["out"]
        if kind == "self_attn":
            assert isinstance(out, tuple) and len(out) == len(base)
            base, out = base[0], out[0]
        scale = layer.lora_scale if style == "adaptformer" else None
        delta = reference_delta(
            rec["norm"],
            layer.lora_A,
            layer.lora_B,
            layer.lora_router,
            groups,
            None if style == "adaptformer" else layer.scaling,
            relu=style != "lowrank",
            expert_scale=scale,
        )
        assert delta.abs().max() > 1e-3  # a real update is checked
        torch.testing.assert_close(out.double(), base.double() + delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("placement", "kind"), [("block_ffn", "mlp"), ("block_attn", "self_attn")])
def test_block_output_is_base_block_plus_delta_of_post_norm_input(cfg, placement: str, kind: str) -> None:
    model, acfg = fresh(cfg, placement=placement, num_heads=3, rank=4)
    inject_adapters(model, acfg)
    for i, layer in enumerate(adapter_layers(model).values()):
        randomise(layer, seed=i, scale=0.2)
    _hooked_block_check(model, kind, groups=2)


@pytest.mark.parametrize("style", ["bottleneck", "adaptformer"])
def test_block_styles_follow_their_equation(cfg, style: str) -> None:
    model, acfg = fresh(cfg, block_style=style, num_heads=3, rank=4, routing_groups=1)
    inject_adapters(model, acfg)
    for layer in adapter_layers(model).values():
        randomise(layer, scale=0.2)
    _hooked_block_check(model, "mlp", groups=1, style=style)


@pytest.mark.parametrize(
    ("overrides", "starts_at_base"),
    [
        ({"placement": "block_ffn"}, True),
        ({"placement": "both"}, True),
        ({"placement": "both", "block_style": "adaptformer"}, True),
        ({"placement": "component"}, True),
        ({"placement": "block_ffn", "block_style": "bottleneck"}, False),  # B ~ N(0, 0.02²) [code]
    ],
)
def test_init_leaves_base_model_output_unchanged(cfg, overrides: dict, starts_at_base: bool) -> None:
    ids = tokens(length=10)
    model, acfg = fresh(cfg, **overrides)
    before = logits(model, ids)
    inject_adapters(model, acfg)
    after = logits(model, ids)
    if starts_at_base:
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    else:
        assert (after - before).abs().max() > 1e-4


def test_adaptformer_scale_init_zero_gets_no_gradient_but_positive_does(cfg) -> None:
    for init, moves in ((0.0, False), (0.1, True)):
        model, acfg = fresh(cfg, block_style="adaptformer", adaptformer_scale_init=init)
        inject_adapters(model, acfg)
        model.train()
        model(input_ids=tokens(length=10)).logits.square().mean().backward()
        layer = next(iter(adapter_layers(model).values()))
        assert bool(layer.lora_B.grad.abs().max() > 0) is moves
        assert float(layer.lora_scale.detach()[0]) == pytest.approx(init)


def test_block_balance_losses_average_over_layers(cfg) -> None:
    model, acfg = fresh(cfg, placement="both", balance_weight=0.5)
    ctx = inject_adapters(model, acfg)
    inputs: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        randomise(layer, scale=0.2)
        layer.register_forward_pre_hook(
            lambda m, a, k, name=name: inputs.__setitem__(name, a[0] if a else k["hidden_states"]),
            with_kwargs=True,
        )
    model.train()
    ctx.begin()
    model(input_ids=tokens(length=10))
    assert set(ctx.aux_losses) == {f"{n}.balance" for n in inputs} and len(inputs) == 4
    for name, u in inputs.items():  # each entry is 0.5 · cv² / 4 (the loop's sum = 0.5 × mean over layers)
        router = adapter_layers(model)[name].lora_router.detach().double().numpy()
        lg = (u.detach().double().numpy().reshape(-1, 96) @ router.T).reshape(-1, 2, 16)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p_bar = (p / p.sum(-1, keepdims=True)).reshape(-1, 16).mean(0)
        cv2 = p_bar.var(ddof=1) / (p_bar.mean() ** 2 + 1e-10)
        assert float(ctx.aux_losses[f"{name}.balance"].detach()) == pytest.approx(0.5 * cv2 / 4, rel=1e-4)


def test_merge_refuses_block_adapters(cfg) -> None:
    model, acfg = fresh(cfg)
    inject_adapters(model, acfg)
    with pytest.raises(TypeError, match="BlockAdapter"):
        merge_adapters(model)
    layer = next(iter(adapter_layers(model).values()))
    with pytest.raises(TypeError, match="cannot be merged"):
        layer.merge()


def test_capture_hands_over_the_shared_a_output(cfg) -> None:
    model, acfg = fresh(cfg)
    ctx = inject_adapters(model, acfg)
    ctx.begin(capture=True)
    model(input_ids=tokens(length=10))
    assert set(ctx.captured) == {f"model.layers.{i}.mlp.lora_A" for i in range(2)}
    assert next(iter(ctx.captured.values())).shape == (2, 10, 16)


@pytest.mark.parametrize("placement", ["block_ffn", "component"])
def test_save_load_round_trip(cfg, placement: str, tmp_path: Path) -> None:
    ids = tokens(length=10)
    model, acfg = fresh(cfg, placement=placement)
    inject_adapters(model, acfg)
    for layer in adapter_layers(model).values():
        randomise(layer)
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "a", OmegaConf.to_container(acfg))
    saved = adapter_state_dict(model)
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    other, acfg2 = fresh(cfg, placement=placement)
    inject_adapters(other, acfg2)
    assert (logits(other, ids) - expected).abs().max() > 1e-3
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(logits(other, ids), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("placement", ["block_ffn", "component"])
def test_bf16_forward(cfg, placement: str) -> None:
    model, acfg = fresh(cfg, placement=placement)
    inject_adapters(model, acfg)
    for layer in adapter_layers(model).values():
        randomise(layer, scale=0.2)
    ref = logits(model, tokens(length=10)).float()
    model.to(torch.bfloat16)
    for layer in adapter_layers(model).values():  # adapter tensors back to fp32, as the project keeps them
        for p in layer.parameters(recurse=False):
            p.data = p.data.float()
    out = logits(model, tokens(length=10))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model.float(), tokens(length=10))
    assert torch.isfinite(auto).all()


# ---------------------------------------------------------------- the paper's parameter counts


@pytest.mark.parametrize(
    ("overrides", "millions", "pct", "modules"),
    [
        (["adapter.routing_groups=1"], 37.7, 0.56, 32),  # block FFN, r=16, 16 experts
        (["adapter.routing_group_size=2048"], 39.8, 0.59, 32),  # + FGR, group 2048 (= default g=2)
        (["adapter.placement=component", "adapter.routing_groups=1"], 75.5, 1.11, 64),  # q,v component
    ],
)
def test_parameter_counts_of_the_paper(
    overrides: list[str], millions: float, pct: float, modules: int
) -> None:
    res = count(compose_train(["model=llama2-7b", "adapter=mtlora", *overrides]))
    assert round(res["trainable"] / 1e6, 1) == millions
    assert round(res["trainable_pct"], 2) == pct
    assert res["adapted_modules"] == modules
    n, r, d = 16, 16, 4096  # 32 layers x (1 FFN block | 2 projections q, v)
    g = 2 if "adapter.routing_group_size=2048" in overrides else 1
    per = r * d + n * d * r + n * g * d  # A + B_i + router, d_in = d_out = 4096 everywhere here
    assert res["trainable"] == modules * per
    assert math.isclose(res["total"], res["base"] + res["trainable"])


def test_meta_device_count_matches_the_default_preset() -> None:
    res = count(compose_train(["model=llama2-7b", "adapter=mtlora"]))
    assert res["adapted_kinds"] == ["mlp"] and round(res["trainable"] / 1e6, 1) == 39.8
