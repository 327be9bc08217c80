"""Shared-A multi-head adapters (HydraLoRA, R-LoRA, M-LoRA; docs/methods.md §1-§3) on toy layers and the
tiny model: forward equations, dropout placements, init (zero-B, R-LoRA random init, offset), the fp32
router, merge rules, injection, save/load, capture, batching of the heads, config checks.

Every expected value is computed here with explicit per-head Python loops and plain matmuls,
independently of the layers' own (batched) code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from mtlora.adapters import (
    HydraLoraLinear,
    LoraLinear,
    MLoraLinear,
    RLoraLinear,
    adapter_layers,
    adapter_state_dict,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.models import build_model
from tests.helpers.compose import CONF as CONF_DIR
from tests.helpers.compose import compose_train
from tests.helpers.tiny import injected, logits, tokens

D_IN, D_OUT, RANK, HEADS, ALPHA = 16, 12, 4, 3, 8.0
CLASSES = {"hydralora": HydraLoraLinear, "rlora": RLoraLinear, "mlora": MLoraLinear}
METHODS = list(CLASSES)


def make(cls, seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True)
    ctx = AdapterContext()
    args = {"rank": RANK, "alpha": ALPHA, "num_heads": HEADS, **kw}
    return cls(base, "blocks.0.up_proj", ctx, **args), base, ctx


def randomise(layer, seed: int = 1, b_scale: float = 1.0) -> None:
    """Move the trainable tensors away from their init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(b_scale * torch.randn(layer.lora_B.shape, generator=g))
        layer.lora_A.add_(0.2 * torch.randn(layer.lora_A.shape, generator=g))
        if hasattr(layer, "lora_router"):
            layer.lora_router.copy_(torch.randn(layer.lora_router.shape, generator=g))


def reference(
    x,
    base: nn.Linear,
    a,
    b_heads,
    scaling: float,
    router=None,
    coef: float = 1.0,
    offset=None,
    in_masks=None,
    shared_mask=None,
    out_masks=None,
):
    """W0 x + b + s Σ_i c_i B_i z_i − offset x, one head at a time.

    c_i = softmax(router x)_i (router given) or ``coef``; z_i = A (x ⊙ in_mask_i) | A (x ⊙ shared_mask)
    | (A x) ⊙ out_mask_i | A x; ``offset`` is a (d_out, d_in) matrix already scaled."""
    x = x.float()
    out = x @ base.weight.detach().float().T + base.bias.detach().float()
    if router is not None:
        w = torch.softmax(x @ router.float().T, dim=-1)
    total = torch.zeros_like(out)
    for i in range(b_heads.shape[0]):
        xi = x
        if in_masks is not None:
            xi = x * in_masks[..., i, :]
        if shared_mask is not None:
            xi = x * shared_mask
        zi = xi @ a.float().T
        if out_masks is not None:
            zi = zi * out_masks[..., i, :]
        hi = zi @ b_heads[i].float().T
        ci = w[..., i : i + 1] if router is not None else coef
        total = total + ci * hi
    out = out + scaling * total
    if offset is not None:
        out = out - x @ offset.T
    return out


def offset_matrix(a0, b0, scaling: float, coef: float) -> torch.Tensor:
    """s · coef · Σ_i B_i(0) A(0), by a loop over heads."""
    m = torch.zeros(b0.shape[1], a0.shape[1])
    for i in range(b0.shape[0]):
        m += b0[i] @ a0
    return scaling * coef * m


def init_values(layer):
    return layer.lora_A.detach().clone(), layer.lora_B.detach().clone()


def params_of(layer):
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    r = layer.lora_router.detach() if hasattr(layer, "lora_router") else None
    return a, b, r


# ---------------------------------------------------------------- structure: one batched head tensor


@pytest.mark.parametrize("method", METHODS)
def test_heads_are_one_parameter_not_a_module_list(method: str) -> None:
    layer, _, _ = make(CLASSES[method])
    assert not any(isinstance(m, nn.ModuleList | nn.ModuleDict) for m in layer.modules())
    names = {n for n, _ in layer.named_parameters()}
    expected = {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    if method != "mlora":
        expected.add("lora_router")
        assert layer.lora_router.shape == (HEADS, D_IN)
        assert layer.lora_router.dtype == torch.float32
    assert names == expected
    assert layer.lora_A.shape == (RANK, D_IN)
    assert layer.lora_B.shape == (HEADS, D_OUT, RANK)


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("place", ["input_per_head", "input_shared", "A_out_per_head"])
def test_head_computation_does_not_grow_with_the_head_count(method: str, place: str) -> None:
    """A Python loop over heads would issue more torch calls with more heads; batched heads do not."""
    counts = []
    for n in (2, 9):
        layer, _, _ = make(CLASSES[method], num_heads=n, dropout=0.3, dropout_place=place)
        randomise(layer)
        x = torch.randn(2, 5, D_IN)
        for mode in (layer.train, layer.eval):
            mode()
            with _CountCalls() as c:
                layer(x).sum().backward()
            counts.append(c.calls)
    assert counts[:2] == counts[2:], counts


# ---------------------------------------------------------------- forward equations (eval: no dropout)


@pytest.mark.parametrize(
    ("method", "kw", "coef"),
    [
        ("hydralora", {}, None),
        ("hydralora", {"use_rslora": True}, None),
        ("rlora", {}, None),
        ("rlora", {"init_scale": "code", "init_offset": False}, None),
        ("mlora", {"combine": "sum"}, 1.0),
        ("mlora", {"combine": "mean"}, 1.0 / HEADS),
    ],
    ids=["hydra", "hydra-rslora", "rlora", "rlora-code-nooffset", "mlora-sum", "mlora-mean"],
)
def test_forward_matches_equation(method: str, kw: dict, coef) -> None:
    layer, base, _ = make(CLASSES[method], **kw)
    a0, b0 = init_values(layer)
    randomise(layer)
    layer.eval()
    a, b, r = params_of(layer)
    s = ALPHA / math.sqrt(RANK) if kw.get("use_rslora") else ALPHA / RANK
    assert layer.scaling == pytest.approx(s)
    offset = None
    if method != "hydralora" and kw.get("init_offset", True):
        offset = offset_matrix(a0, b0, s, coef if coef is not None else 1.0 / HEADS)
    x = torch.randn(3, 5, D_IN)
    expected = reference(x, base, a, b, s, router=r, coef=coef or 1.0, offset=offset)
    out = layer(x)
    assert out.shape == (3, 5, D_OUT)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-2


def test_mlora_sum_and_mean_differ_by_the_head_count() -> None:
    total, base, _ = make(MLoraLinear, combine="sum", init_offset=False)
    mean, _, _ = make(MLoraLinear, combine="mean", init_offset=False)
    mean.load_state_dict(total.state_dict())
    x = torch.randn(4, D_IN)
    torch.testing.assert_close((total(x) - base(x)) / HEADS, mean(x) - base(x), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- dropout placements (train mode)


def _masks(seed: int, shape, p: float) -> torch.Tensor:
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape), p=p, training=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("place", ["input_per_head", "input_shared", "A_out_per_head"])
def test_dropout_placement_equations(method: str, place: str) -> None:
    p = 0.5
    layer, base, _ = make(CLASSES[method], dropout=p, dropout_place=place, init="zero_B")
    randomise(layer)
    a, b, r = params_of(layer)
    coef = 1.0 if method == "mlora" else None
    x = torch.randn(2, 7, D_IN)
    layer.eval()
    clean = reference(x, base, a, b, layer.scaling, router=r, coef=coef or 1.0)
    torch.testing.assert_close(layer(x), clean, atol=1e-5, rtol=1e-5)  # eval: no dropout anywhere

    layer.train()
    torch.manual_seed(11)
    out = layer(x)
    kw = {}
    if place == "input_per_head":
        kw["in_masks"] = m = _masks(11, (2, 7, HEADS, D_IN), p)
    elif place == "input_shared":
        kw["shared_mask"] = m = _masks(11, (2, 7, D_IN), p)
    else:
        kw["out_masks"] = m = _masks(11, (2, 7, HEADS, RANK), p)
    expected = reference(x, base, a, b, layer.scaling, router=r, coef=coef or 1.0, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - clean).abs().max() > 1e-3
    if place != "input_shared":  # independent masks per head
        assert not torch.equal(m[..., 0, :], m[..., 1, :])


def test_each_method_defaults_to_its_documented_dropout_place_and_init() -> None:
    ctx = AdapterContext()
    composed = {}
    for method, place, init in [
        ("hydralora", "input_per_head", "zero_B"),
        ("rlora", "A_out_per_head", "rlora"),
        ("mlora", "A_out_per_head", "rlora"),
    ]:
        cfg = composed[method] = compose_train([f"adapter={method}"]).adapter
        layer = ADAPTER_METHODS[method].from_config(nn.Linear(D_IN, D_OUT), "x", ctx, cfg)
        assert (layer.dropout_place, layer.init) == (place, init), method
        # the class defaults (knob missing from the config) agree with the yaml
        trimmed = OmegaConf.masked_copy(cfg, ["rank", "alpha", "dropout", "use_rslora", "num_heads"])
        layer2 = ADAPTER_METHODS[method].from_config(nn.Linear(D_IN, D_OUT), "x", ctx, trimmed)
        assert (layer2.dropout_place, layer2.init) == (place, init), method
    assert composed["mlora"].combine == "sum"  # paper §3.1
    # the released reinit.py's scaling (methods.md §2, §12.3)
    assert composed["rlora"].init_scale == "code"
    assert composed["mlora"].init_scale == "code"


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("method", ["hydralora", "rlora"])
def test_zero_b_init_leaves_base_output_unchanged(method: str) -> None:
    layer, base, _ = make(CLASSES[method], init="zero_B", dropout=0.3)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not hasattr(layer, "lora_offset_A")  # no offset with B = 0
    bound = 1 / math.sqrt(D_IN)
    for t in (layer.lora_A, layer.lora_router):  # kaiming_uniform(a=√5)
        assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound
    x = torch.randn(6, D_IN)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_hydralora_default_is_zero_b() -> None:
    layer, base, _ = make(HydraLoraLinear)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


BIG_IN, BIG_OUT, BIG_R, BIG_N, GAMMA = 1024, 512, 16, 3, 64.0


@pytest.mark.parametrize("init_scale", ["paper", "code", "none"])
def test_rlora_random_init_has_the_specified_scale(init_scale: str) -> None:
    layer, _, _ = make(
        RLoraLinear, d_in=BIG_IN, d_out=BIG_OUT, rank=BIG_R, num_heads=BIG_N, init_scale=init_scale
    )
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if init_scale == "paper":  # d_out^(1/4)/√γ once on A and on every B_i
        f = BIG_OUT**0.25 / math.sqrt(GAMMA)
        fa, fb = f, [f] * BIG_N
    elif init_scale == "code":  # r^(1/4)/√γ, N times on A, N−i times on B_i
        f = BIG_R**0.25 / math.sqrt(GAMMA)
        fa, fb = f**BIG_N, [f ** (BIG_N - i) for i in range(BIG_N)]
    else:
        fa, fb = 1.0, [1.0] * BIG_N
    assert a.mean().abs() < 0.05 * a.std()
    assert a.std().item() == pytest.approx(fa / math.sqrt(BIG_IN), rel=0.03)
    for i in range(BIG_N):
        assert b[i].std().item() == pytest.approx(fb[i] / math.sqrt(BIG_OUT), rel=0.03), i
    # Gaussian, not uniform: some draws beyond 3σ (a uniform of that std stops at √3σ)
    assert (a.abs() > 3 * a.std()).any()
    # each head its own draw (the symmetry breaking)
    for i in range(BIG_N):
        for j in range(i):
            cos = F.cosine_similarity(b[i].flatten(), b[j].flatten(), dim=0)
            assert cos.abs() < 0.1


def test_rlora_init_variants_differ_as_documented() -> None:
    std = {}
    for s in ("paper", "code"):
        layer, _, _ = make(RLoraLinear, d_in=BIG_IN, d_out=BIG_OUT, rank=4, num_heads=5, init_scale=s)
        std[s] = (layer.lora_A.std().item(), [layer.lora_B[i].std().item() for i in range(5)])
    # code: the per-head scale falls with the head index (f^(N−i)), the paper keeps it equal
    code_b = std["code"][1]
    assert all(code_b[i] < code_b[i + 1] for i in range(4))
    paper_b = std["paper"][1]
    assert max(paper_b) / min(paper_b) < 1.1
    # the documented magnitude with r=4, γ=64, N=5: A × 1.7e-4 and B_4 × 0.18 (methods.md §2)
    f = 4**0.25 / 8
    assert f == pytest.approx(0.177, abs=1e-3)
    assert std["code"][0] * math.sqrt(BIG_IN) == pytest.approx(f**5, rel=0.05)
    assert code_b[4] * math.sqrt(BIG_OUT) == pytest.approx(f, rel=0.05)


def reinit_replay(
    seed: int, d_in: int, d_out: int, r: int, n: int, gamma: float, routed: bool, stable: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """R-LoRA's released ``reinit.py`` (lora_A_init = lora_B_init = "unit", init_scale = "stable"), replayed
    on plain tensors from ``torch.manual_seed(seed)``: returns ``A (r, d_in)``, ``B (N, d_out, r)``, router.

    The layer draws its router (kaiming-uniform, a=√5) first; then the code's order: ``A ~ N(0, 1/max(r,
    d_in))``, then for each head i: ``B_i ~ N(0, 1/max(d_out, r))`` (its own draw, an nn.Linear(r, d_out)
    weight), followed — inside that same loop — by ``A *= r^{1/4}/√γ`` and ``B_j *= r^{1/4}/√γ`` for every
    head j (heads j > i are drawn afresh later, so only B_0..B_i keep it).
    """
    torch.manual_seed(seed)
    router = None
    if routed:
        router = torch.empty(n, d_in)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))
    a = torch.zeros(r, d_in)
    heads = [torch.zeros(d_out, r) for _ in range(n)]
    rows_b, cols_b = heads[0].shape  # (d_out, r)
    rows_a, cols_a = a.shape  # (r, d_in)
    a.normal_(0.0, 1.0 / max(rows_a, cols_a) ** 0.5)
    for i in range(n):
        heads[i].normal_(0.0, 1.0 / max(rows_b, cols_b) ** 0.5)
        if stable:
            a *= rows_a**0.25 / gamma**0.5  # rows of A = r
            for j in range(n):
                heads[j] *= cols_b**0.25 / gamma**0.5  # columns of B = r
    return a, torch.stack(heads), router


def _rlora_init_presets() -> list[str]:
    """Presets whose adapter uses R-LoRA's random init (adapter rlora/mlora and no other ``init``)."""
    out = []
    for path in sorted((CONF_DIR / "experiment").glob("*/*/*.yaml")):
        raw = OmegaConf.load(path)
        chosen = [d["override /adapter"] for d in raw.get("defaults", []) if "override /adapter" in d]
        if not chosen:
            continue
        init = OmegaConf.select(raw, "adapter.init")
        if init is None:
            init = OmegaConf.load(CONF_DIR / "adapter" / f"{chosen[0]}.yaml").get("init")
        if init == "rlora":
            out.append(str(path.relative_to(CONF_DIR / "experiment").with_suffix("")))
    return out


RLORA_INIT_PRESETS = _rlora_init_presets()
# odd widths: d_out·r is no multiple of 16, where one normal_ call over all heads would draw different
# numbers than one call per head (torch's CPU normal_ fills 16 values at a time)
ODD_IN, ODD_OUT = 37, 29


def test_the_rlora_init_presets_are_found() -> None:
    assert len(RLORA_INIT_PRESETS) >= 15
    for p in ("align_lora/t1/rlora", "align_lora/t2/mlora", "rlora/t4/rlora", "rlora/t5/hydralora_init"):
        assert p in RLORA_INIT_PRESETS
    assert "align_lora/t1/hydralora_no_router" not in RLORA_INIT_PRESETS  # zero-B init


@pytest.mark.parametrize("source", ["adapter=rlora", "adapter=mlora", *RLORA_INIT_PRESETS])
def test_default_and_preset_init_equal_the_released_reinit_bit_for_bit(source: str) -> None:
    """The method defaults and every R-LoRA/M-LoRA preset start from reinit.py's init at the same seed."""
    over = [source] if source.startswith("adapter=") else [f"experiment={source}"]
    cfg = compose_train(over).adapter
    cls = ADAPTER_METHODS[cfg.method]
    base = nn.Linear(ODD_IN, ODD_OUT)
    seed = 7
    torch.manual_seed(seed)
    layer = cls.from_config(base, "blocks.0.up_proj", AdapterContext(), cfg)
    a, b, router = reinit_replay(
        seed, ODD_IN, ODD_OUT, cfg.rank, cfg.num_heads, float(cfg.stable_gamma), routed=cls.routed
    )
    assert torch.equal(layer.lora_A.detach(), a)
    assert torch.equal(layer.lora_B.detach(), b)
    if cls.routed:
        assert torch.equal(layer.lora_router.detach(), router)
    # the offset is the code's s·(1/N)·Σ_i B_i A (router) or s·c·Σ_i B_i A (no router), kept as buffers
    coef = 1.0 / cfg.num_heads if cls.routed else layer.head_coef
    off = layer.scaling * layer.lora_offset_B @ layer.lora_offset_A
    torch.testing.assert_close(off, offset_matrix(a, b, layer.scaling, coef), atol=1e-9, rtol=1e-5)


def test_unscaled_init_equals_the_codes_draws_without_the_stable_scaling() -> None:
    base = nn.Linear(ODD_IN, ODD_OUT)
    torch.manual_seed(3)
    layer = RLoraLinear(base, "x", AdapterContext(), rank=4, alpha=32, num_heads=5, init_scale="none")
    a, b, _ = reinit_replay(3, ODD_IN, ODD_OUT, 4, 5, 64.0, routed=True, stable=False)
    assert torch.equal(layer.lora_A.detach(), a) and torch.equal(layer.lora_B.detach(), b)


def test_paper_and_code_scales_differ_by_the_analytic_factors_at_qwen_up_proj() -> None:
    """Qwen2.5-0.5B up_proj (896 -> 4864), r=4, N=5, γ=64: the paper's A is about 6,000x the code's."""
    d_in, d_out, r, n, gamma = 896, 4864, 4, 5, 64.0
    f_paper = d_out**0.25 / math.sqrt(gamma)  # once on A and on every B_i
    f_code = r**0.25 / math.sqrt(gamma)  # A: f^N, B_i: f^(N-i)
    ratio_a = f_paper / f_code**n
    assert f_paper == pytest.approx(1.0439, abs=1e-4) and f_code == pytest.approx(0.17678, abs=1e-5)
    assert ratio_a == pytest.approx(6048, rel=1e-3)  # "about 6,000x"
    # the two layers share their draws (same seed), so each tensor differs by exactly these factors
    layers = {}
    for scale in ("paper", "code"):
        torch.manual_seed(0)
        layers[scale] = RLoraLinear(
            nn.Linear(d_in, d_out, bias=False),
            "x",
            AdapterContext(),
            rank=r,
            alpha=32,
            num_heads=n,
            init_scale=scale,
        )
    p, c = layers["paper"], layers["code"]
    torch.testing.assert_close(p.lora_A.detach(), c.lora_A.detach() * ratio_a, rtol=1e-5, atol=0)
    for i in range(n):
        want = c.lora_B[i].detach() * (f_paper / f_code ** (n - i))
        torch.testing.assert_close(p.lora_B[i].detach(), want, rtol=1e-5, atol=0)


def test_mlora_offset_makes_initial_output_equal_to_base() -> None:
    layer, base, _ = make(MLoraLinear, init_scale="none")  # large random B, offset on
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
    layer.eval()
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=0)
    no_off, base2, _ = make(MLoraLinear, init_scale="none", init_offset=False)
    no_off.eval()
    assert (no_off(x) - base2(x)).abs().max() > 1e-1  # the random init alone moves the output


def test_rlora_offset_exact_for_uniform_router_and_as_documented_otherwise() -> None:
    layer, base, _ = make(RLoraLinear, init_scale="none")
    layer.eval()
    x = torch.randn(4, 6, D_IN)
    a0, b0, r0 = params_of(layer)
    # kaiming router: the output differs from the base by exactly s Σ_i (ω_i(x) − 1/N) B_i A x
    w = torch.softmax(x @ r0.T, dim=-1)
    expected_gap = torch.zeros(4, 6, D_OUT)
    for i in range(HEADS):
        expected_gap += (w[..., i : i + 1] - 1.0 / HEADS) * ((x @ a0.T) @ b0[i].T)
    expected_gap *= layer.scaling
    gap = layer(x) - base(x)
    torch.testing.assert_close(gap, expected_gap, atol=1e-5, rtol=1e-5)
    assert gap.abs().max() > 1e-3  # not exact with a non-uniform router (as the doc says)
    # a uniform router (zero logits): exact
    with torch.no_grad():
        layer.lora_router.zero_()
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=0)
    # and without the offset the same uniform-router model is far from the base
    no_off, base2, _ = make(RLoraLinear, init_scale="none", init_offset=False)
    no_off.eval()
    with torch.no_grad():
        no_off.lora_router.zero_()
    assert (no_off(x) - base2(x)).abs().max() > 1e-1


def test_offset_buffers_are_frozen_init_values_and_base_weight_untouched() -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    w0 = base.weight.detach().clone()
    layer = RLoraLinear(base, "x", AdapterContext(), rank=RANK, alpha=ALPHA, num_heads=HEADS)
    torch.testing.assert_close(base.weight.detach(), w0, atol=0, rtol=0)
    a0, b0 = init_values(layer)
    torch.testing.assert_close(layer.lora_offset_A, a0, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_offset_B, b0.mean(0), atol=1e-7, rtol=0)
    assert {n for n, _ in layer.named_buffers()} == {"lora_offset_A", "lora_offset_B"}
    layer(torch.randn(3, D_IN)).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_router.grad is not None


# ---------------------------------------------------------------- router: fp32, sums to one


@pytest.mark.parametrize("method", ["hydralora", "rlora"])
def test_router_weights_sum_to_one_in_fp32_for_bf16_inputs(method: str) -> None:
    layer, base, _ = make(CLASSES[method])
    a0, b0 = init_values(layer)
    randomise(layer, b_scale=0.3)
    layer.to(torch.bfloat16).eval()
    x = torch.randn(3, 5, D_IN).to(torch.bfloat16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            w = layer.router_weights(x)
        assert w.dtype == torch.float32
        assert w.shape == (3, 5, HEADS)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)
        expected = torch.softmax(x.float() @ layer.lora_router.detach().float().T, dim=-1)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    a, b, r = params_of(layer)
    offset = offset_matrix(a0, b0, layer.scaling, 1.0 / HEADS) if method == "rlora" else None
    expected = reference(x.float(), copy.deepcopy(base).float(), a, b, layer.scaling, router=r, offset=offset)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_with_fp32_adapter_and_autocast(method: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = CLASSES[method](base, "x", AdapterContext(), rank=RANK, alpha=ALPHA, num_heads=HEADS, dropout=0.1)
    assert {p.dtype for n, p in layer.named_parameters() if n.startswith("lora")} == {torch.float32}
    randomise(layer)
    x = torch.randn(2, 3, D_IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.float())
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_B.grad).all()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("combine", ["sum", "mean"])
@pytest.mark.parametrize("offset", [True, False])
def test_mlora_merge_equals_unmerged_and_unmerge_restores(combine: str, offset: bool) -> None:
    layer, base, _ = make(MLoraLinear, combine=combine, init_offset=offset, dropout=0.2)
    a0, b0 = init_values(layer)
    randomise(layer)
    layer.eval()
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 6, D_IN)
    unmerged = layer(x).detach()
    coef = 1.0 if combine == "sum" else 1.0 / HEADS
    a, b, _ = params_of(layer)
    dw = offset_matrix(a, b, layer.scaling, coef)
    if offset:
        dw -= offset_matrix(a0, b0, layer.scaling, coef)

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.merge()  # idempotent
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-5, rtol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["hydralora", "rlora"])
def test_routed_merge_raises_a_clear_type_error(method: str) -> None:
    layer, base, _ = make(CLASSES[method])
    randomise(layer)
    assert not layer.mergeable
    w0 = base.weight.detach().clone()
    with pytest.raises(TypeError, match=rf"{method}.*router.*cannot be merged"):
        layer.merge()
    with pytest.raises(TypeError, match="cannot be merged"):
        layer.delta_weight()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=0, rtol=0)


# ---------------------------------------------------------------- capture


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("place", ["input_per_head", "input_shared", "A_out_per_head"])
def test_capture_stores_the_shared_a_output(method: str, place: str) -> None:
    layer, _, ctx = make(CLASSES[method], dropout=0.5, dropout_place=place)
    randomise(layer)
    x = torch.randn(2, 5, D_IN)
    a = layer.lora_A.detach()
    layer.eval()
    ctx.begin(capture=True)
    layer(x)
    assert set(ctx.captured) == {"blocks.0.up_proj.lora_A"}
    z = ctx.captured["blocks.0.up_proj.lora_A"]
    assert z.shape == (2, 5, RANK)
    torch.testing.assert_close(z, x @ a.T, atol=1e-6, rtol=1e-6)

    layer.train()
    ctx.begin(capture=True)
    torch.manual_seed(4)
    layer(x)
    z = ctx.captured["blocks.0.up_proj.lora_A"]
    assert z.shape == (2, 5, RANK) and z.requires_grad  # part of the graph, for alignment losses
    # input_shared: A drop(x) with the one mask every head sees; otherwise A x before the per-head masks
    # (with per-head input masks there is no single A drop(x))
    masked = x * _masks(4, (2, 5, D_IN), 0.5) if place == "input_shared" else x
    expected = masked @ a.T
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    ctx.begin(capture=False)
    layer(x)
    assert ctx.captured == {}


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["adapter=hydralora", "adapter.num_heads=0"], "adapter.num_heads=0: must be an integer >= 1"),
        (["adapter=rlora", "adapter.dropout_place=output"], "adapter.dropout_place='output'"),
        (["adapter=rlora", "adapter.init_scale=stable"], "adapter.init_scale='stable'"),
        (["adapter=rlora", "adapter.stable_gamma=0"], "adapter.stable_gamma=0"),
        (["adapter=mlora", "adapter.combine=softmax"], "adapter.combine='softmax': must be one of"),
        (["adapter=mlora", "adapter.init=kaiming"], "adapter.init='kaiming'"),
        (["adapter=mlora", "~adapter.num_heads"], "adapter.num_heads: missing"),
    ],
)
def test_bad_multihead_values_name_the_key(overrides: list[str], expected: str, tmp_path: Path) -> None:
    cfg = compose_train(overrides, run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert expected in str(e.value)


def test_lora_config_needs_no_num_heads(tmp_path: Path) -> None:
    validate_config(compose_train([], run_dir=tmp_path))
    # a knob of other methods (num_heads) is refused for lora, not checked by the rule of its name
    with pytest.raises(ConfigError, match="adapter.num_heads=-1"):
        validate_config(compose_train(["+adapter.num_heads=-1"], run_dir=tmp_path))


def test_layer_constructor_rejects_bad_knobs() -> None:
    for kw, key in [
        ({"num_heads": 0}, "num_heads"),
        ({"dropout_place": "x"}, "dropout_place"),
        ({"init_scale": "x"}, "init_scale"),
        ({"init": "x"}, "init"),
    ]:
        with pytest.raises(ConfigError, match=f"adapter.{key}"):
            make(RLoraLinear, **kw)
    with pytest.raises(ConfigError, match="adapter.combine"):
        make(MLoraLinear, combine="max")


# ---------------------------------------------------------------- on the tiny model


@pytest.mark.parametrize("method", METHODS)
def test_inject_only_adapter_parameters_trainable(method: str) -> None:
    model, cfg, ctx = injected(method)
    base_logits = logits(build_model(cfg.model), tokens())
    layers = adapter_layers(model)
    assert len(layers) == 3 * cfg.model.arch.num_hidden_layers  # gate/up/down of each layer
    assert all(type(m) is CLASSES[method] and m.context is ctx for m in layers.values())
    kinds = ["lora_A", "lora_B"] + ([] if method == "mlora" else ["lora_router"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in kinds}
    assert all(not m.base_layer.weight.requires_grad for m in layers.values())
    assert not model.get_input_embeddings().weight.requires_grad
    got = logits(model, tokens())
    if method == "hydralora":  # B = 0
        torch.testing.assert_close(got, base_logits, atol=0, rtol=0)
    elif method == "mlora":  # random B, exact offset
        torch.testing.assert_close(got, base_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_adapter_round_trip(method: str, tmp_path: Path) -> None:
    ids = tokens()
    model, cfg, _ = injected(method, seed=0)
    for layer in adapter_layers(model).values():
        randomise(layer, seed=3, b_scale=0.1)
    want = logits(model, ids)
    out = save_adapter(model, tmp_path / "adapter", OmegaConf.to_container(cfg.adapter))
    saved = adapter_state_dict(model)
    if method != "hydralora":  # R-LoRA's offset travels with the adapter
        assert any(k.endswith("lora_offset_A") for k in saved)
    other, _, _ = injected(method, seed=1)
    assert (logits(other, ids) - want).abs().max() > 1e-3
    load_adapter(other, out)
    got = adapter_state_dict(other)
    assert set(got) == set(saved)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits(other, ids), want, atol=0, rtol=0)


def test_merge_adapters_on_the_model() -> None:
    model, _, _ = injected("rlora")
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)
    assert not any(m.merged for m in adapter_layers(model).values())
    model, _, _ = injected("mlora")
    for layer in adapter_layers(model).values():
        randomise(layer, b_scale=0.1)
    want = logits(model, tokens())
    merge_adapters(model)
    torch.testing.assert_close(logits(model, tokens()), want, atol=1e-4, rtol=1e-4)


def test_meta_device_layers_build() -> None:
    with torch.device("meta"):
        base = nn.Linear(D_IN, D_OUT)
    for cls in CLASSES.values():
        layer = cls(base, "x", AdapterContext(), rank=RANK, alpha=ALPHA, num_heads=HEADS)
        n = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora"))
        router = 0 if cls is MLoraLinear else HEADS * D_IN
        assert n == RANK * D_IN + HEADS * D_OUT * RANK + router


def test_lora_is_untouched_by_the_new_buffers() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(D_IN, D_OUT), "x", AdapterContext(), rank=RANK, alpha=ALPHA)
    assert list(layer.named_buffers()) == []
