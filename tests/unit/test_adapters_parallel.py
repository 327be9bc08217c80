"""Parallel-LoRA adapters (docs/methods.md §8): MultiLoRA (``multilora``), LoRA-Split (``lora_split``) and
MoLoRA (``molora``) on toy layers and the tiny model: forward equations, init, merge rules, task routing of
the splits, the token router (top-k, balance loss), bf16, gradient checkpointing, injection, save/load.

Every expected value is computed here with explicit per-LoRA / per-expert / per-row Python loops and plain
matmuls, independently of the layers' own (batched) code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from mtlora.adapters import (
    LoraSplitLinear,
    MoLoraLinear,
    MultiLoraLinear,
    adapter_layers,
    adapter_state_dict,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.errors import ConfigError
from mtlora.models import build_model
from tests.helpers.compose import compose_train
from tests.helpers.tiny import injected, logits, tokens

D_IN, D_OUT, RANK, ALPHA = 16, 12, 4, 8.0
N = 3  # LoRAs / experts
K = 2  # splits (of the total rank RANK)
CLASSES = {"multilora": MultiLoraLinear, "lora_split": LoraSplitLinear, "molora": MoLoraLinear}
METHODS = list(CLASSES)
COUNT_KEY = {"multilora": "num_loras", "lora_split": "num_splits", "molora": "num_experts"}


def make(method: str, seed: int = 0, n: int | None = None, base_dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=True).to(base_dtype)
    ctx = AdapterContext()
    if method == "lora_split" and n is not None:
        kw.setdefault("rank", RANK * n)
    args = {"rank": RANK, "alpha": ALPHA, COUNT_KEY[method]: n or (K if method == "lora_split" else N), **kw}
    return CLASSES[method](base, "blocks.0.up_proj", ctx, **args), base, ctx


def randomise(layer, seed: int = 1, scale: float = 1.0) -> None:
    """Move the trainable tensors away from their init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora"):
                p.copy_(scale * torch.randn(p.shape, generator=g))


def base_out(x, base: nn.Linear) -> torch.Tensor:
    return x.float() @ base.weight.detach().float().T + base.bias.detach().float()


# ---------------------------------------------------------------- references (explicit loops)


def ref_multilora(x, base, layer, s: float) -> torch.Tensor:
    a, b, v = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_scale.detach()
    r = layer.rank
    out = base_out(x, base)
    for i in range(layer.num_loras):
        a_i = a[i * r : (i + 1) * r]
        out = out + s * v[i] * (x.float() @ a_i.T @ b[i].T)
    return out


def ref_split(x, base, layer, s: float, row_split=None) -> torch.Tensor:
    """Σ_j s B_j A_j x over all splits, or per row only over split ``row_split[row]``."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    rk = layer.split_rank
    out = base_out(x, base)
    for row in range(x.shape[0]):
        for j in range(layer.num_splits):
            if row_split is not None and row_split[row] != j:
                continue
            sl = slice(j * rk, (j + 1) * rk)
            out[row] = out[row] + s * (x[row].float() @ a[sl].T @ b[:, sl].T)
    return out


def ref_molora(x, base, layer, s: float, top_k=None) -> torch.Tensor:
    a, b, g = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_router.detach()
    r = layer.rank
    p = torch.softmax(x.float() @ g.T, dim=-1)
    w = p.clone()
    if top_k is not None:  # keep the k largest per token, renormalise
        flat_p, flat_w = p.reshape(-1, p.shape[-1]), w.reshape(-1, p.shape[-1])
        for t in range(flat_p.shape[0]):
            keep = sorted(range(p.shape[-1]), key=lambda i: -float(flat_p[t, i]))[:top_k]
            tot = sum(float(flat_p[t, i]) for i in keep)
            for i in range(p.shape[-1]):
                flat_w[t, i] = flat_p[t, i] / tot if i in keep else 0.0
    out = base_out(x, base)
    for i in range(layer.num_experts):
        out = out + s * w[..., i : i + 1] * (x.float() @ a[i * r : (i + 1) * r].T @ b[i].T)
    return out


def ref_cv2(x, router) -> torch.Tensor:
    p = torch.softmax(x.float() @ router.detach().T, dim=-1).reshape(-1, router.shape[0])
    mean_p = p.sum(0) / p.shape[0]
    mu = mean_p.sum() / len(mean_p)
    var = ((mean_p - mu) ** 2).sum() / (len(mean_p) - 1)
    return var / (mu**2 + 1e-10)


# ---------------------------------------------------------------- structure / batching


def test_registered_under_their_method_names() -> None:
    for method, cls in CLASSES.items():
        assert ADAPTER_METHODS[method] is cls
    assert MultiLoraLinear.mergeable and LoraSplitLinear.mergeable and not MoLoraLinear.mergeable


def test_parameter_shapes_and_fp32() -> None:
    shapes = {
        "multilora": {"lora_A": (N * RANK, D_IN), "lora_B": (N, D_OUT, RANK), "lora_scale": (N, D_OUT)},
        "lora_split": {"lora_A": (RANK, D_IN), "lora_B": (D_OUT, RANK)},
        "molora": {"lora_A": (N * RANK, D_IN), "lora_B": (N, D_OUT, RANK), "lora_router": (N, D_IN)},
    }
    for method, want in shapes.items():
        layer, _, _ = make(method, base_dtype=torch.bfloat16)
        got = {n: tuple(p.shape) for n, p in layer.named_parameters() if n.startswith("lora")}
        assert got == want, method
        assert {p.dtype for n, p in layer.named_parameters() if n.startswith("lora")} == {torch.float32}
        assert not any(isinstance(m, nn.ModuleList | nn.ModuleDict) for m in layer.modules())


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
def test_computation_does_not_grow_with_the_number_of_loras(method: str) -> None:
    """A Python loop over LoRAs/splits/experts would issue more torch calls for a larger count."""
    counts = []
    for n in (3, 7):
        kw = {"balance_weight": 0.1, "top_k": 2} if method == "molora" else {}
        layer, _, ctx = make(method, n=n, dropout=0.2, **kw)
        randomise(layer)
        x = torch.randn(3, 5, D_IN)
        for mode in (layer.train, layer.eval):
            mode()
            ctx.begin(task_ids=torch.tensor([0, 5, 3]))
            with _CountCalls() as c:
                layer(x).sum().backward()
            counts.append(c.calls)
    assert counts[:2] == counts[2:], counts


# ---------------------------------------------------------------- MultiLoRA


@pytest.mark.parametrize("rslora", [False, True])
def test_multilora_forward_matches_equation(rslora: bool) -> None:
    layer, base, _ = make("multilora", use_rslora=rslora)
    randomise(layer)
    layer.eval()
    s = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(3, 5, D_IN)
    out = layer(x)
    torch.testing.assert_close(out, ref_multilora(x, base, layer, s), atol=1e-4, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-1


def test_multilora_init_nonzero_factors_zero_scales_leave_base_unchanged() -> None:
    layer, base, _ = make("multilora", dropout=0.3)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    for t, fan_in in ((a, D_IN), (b, RANK)):  # kaiming_uniform(a=√5) = U(±1/√fan_in), non-zero
        bound = 1 / math.sqrt(fan_in)
        assert torch.count_nonzero(t) == t.numel()
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_scale) == 0
    x = torch.randn(4, 3, D_IN)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    # the LoRAs are distinct draws (not one copy repeated)
    assert not torch.allclose(b[0], b[1]) and not torch.allclose(a[:RANK], a[RANK : 2 * RANK])
    # v = 0: only v gets a gradient at the first step
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_scale.grad.abs().max() > 0
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0


def test_multilora_dropout_is_one_shared_mask_of_x() -> None:
    p = 0.5
    layer, base, _ = make("multilora", dropout=p)
    randomise(layer)
    layer.train()
    x = torch.randn(2, 6, D_IN)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones(2, 6, D_IN), p=p, training=True)
    expected = (
        ref_multilora(x * mask, base, layer, layer.scaling) - base_out(x * mask, base) + base_out(x, base)
    )
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- LoRA-Split


@pytest.mark.parametrize("rslora", [False, True])
def test_split_eval_is_the_sum_of_splits_with_per_split_scaling(rslora: bool) -> None:
    layer, base, _ = make("lora_split", rank=6, num_splits=3, use_rslora=rslora)
    randomise(layer)
    layer.eval()
    assert layer.split_rank == 2
    s = ALPHA / math.sqrt(2) if rslora else ALPHA / 2  # the scaling of a rank-2 LoRA, not of rank 6
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(4, 5, D_IN)
    out = layer(x)  # no task ids needed in eval
    torch.testing.assert_close(out, ref_split(x, base, layer, s), atol=1e-4, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-1


def test_split_init_is_lora_init() -> None:
    layer, base, ctx = make("lora_split", dropout=0.2)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(D_IN)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    x = torch.randn(3, 4, D_IN)
    ctx.begin(task_ids=torch.tensor([0, 1, 2]))
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("assign", [None, [1, 0, 1, 1]])
def test_split_training_routes_each_row_to_its_tasks_split(assign) -> None:
    layer, base, ctx = make("lora_split", split_of_task=assign)
    randomise(layer)
    layer.train()
    ids = torch.tensor([0, 1, 2, 3, 2])  # mixed tasks in one batch
    row_split = [t % K for t in ids.tolist()] if assign is None else [assign[t] for t in ids.tolist()]
    assert len(set(row_split)) == K
    ctx.begin(task_ids=ids)
    x = torch.randn(5, 4, D_IN)
    out = layer(x)
    torch.testing.assert_close(out, ref_split(x, base, layer, layer.scaling, row_split), atol=1e-4, rtol=1e-5)
    layer.eval()  # eval: every split, for every row
    torch.testing.assert_close(layer(x), ref_split(x, base, layer, layer.scaling), atol=1e-4, rtol=1e-5)
    assert (layer(x) - out).abs().max() > 1e-1


def test_split_training_row_depends_only_on_its_own_split() -> None:
    layer, _, ctx = make("lora_split")
    randomise(layer)
    layer.train()
    ctx.begin(task_ids=torch.tensor([0, 1]))  # row 0 -> split 0, row 1 -> split 1
    x = torch.randn(2, 3, D_IN)
    before = layer(x).detach()
    rk = layer.split_rank
    with torch.no_grad():  # perturb split 1 only
        layer.lora_B[:, rk:] += 1.0
        layer.lora_A[rk:] += 0.5
    after = layer(x).detach()
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-1
    layer.eval()  # at eval the perturbed split reaches row 0 too
    assert (layer(x)[0] - before[0]).abs().max() > 1e-1


def test_split_training_gradients_reach_only_the_rows_split() -> None:
    layer, _, ctx = make("lora_split", rank=6, num_splits=3, dropout=0.1)
    randomise(layer)
    layer.train()
    ctx.begin(task_ids=torch.tensor([4, 4]))  # task 4 -> split 4 mod 3 = 1
    layer(torch.randn(2, 3, D_IN)).pow(2).sum().backward()
    ga, gb = layer.lora_A.grad, layer.lora_B.grad
    for j in range(3):
        sl = slice(2 * j, 2 * j + 2)
        moved = ga[sl].abs().max() > 0 and gb[:, sl].abs().max() > 0
        assert moved == (j == 1), j


def test_split_routing_none_uses_every_split_in_training() -> None:
    layer, base, ctx = make("lora_split", split_routing="none")
    randomise(layer)
    layer.train()
    ctx.begin(task_ids=None)  # not needed
    x = torch.randn(3, 4, D_IN)
    torch.testing.assert_close(layer(x), ref_split(x, base, layer, layer.scaling), atol=1e-4, rtol=1e-5)


def test_split_task_routing_needs_task_ids_in_training_only() -> None:
    layer, _, ctx = make("lora_split")
    x = torch.randn(2, 3, D_IN)
    layer.train()
    ctx.begin(task_ids=None)
    with pytest.raises(ValueError, match=r"lora_split.*needs task ids in training"):
        layer(x)
    ctx.begin(task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        layer(x)
    ctx.begin(task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="integers"):
        layer(x)
    layer.eval()
    ctx.begin(task_ids=None)
    layer(x)  # fine in eval
    lay2, _, ctx2 = make("lora_split", split_of_task=[0, 1])
    lay2.train()
    ctx2.begin(task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        lay2(x)


def test_split_capture_is_the_down_projection_each_row_uses() -> None:
    layer, _, ctx = make("lora_split")
    randomise(layer)
    x = torch.randn(2, 3, D_IN)
    a = layer.lora_A.detach()
    layer.train()
    ctx.begin(task_ids=torch.tensor([1, 0]), capture=True)
    layer(x)
    z = ctx.captured["blocks.0.up_proj.lora_A"]
    expected = x @ a.T
    expected[0, :, : RANK // 2] = 0  # row 0 (task 1) uses split 1 only
    expected[1, :, RANK // 2 :] = 0
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    ctx.begin(capture=True)
    layer(x)
    torch.testing.assert_close(ctx.captured["blocks.0.up_proj.lora_A"], x @ a.T, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MoLoRA


@pytest.mark.parametrize("rslora", [False, True])
def test_molora_dense_forward_matches_equation(rslora: bool) -> None:
    layer, base, _ = make("molora", use_rslora=rslora)
    randomise(layer)
    layer.eval()
    s = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(3, 5, D_IN)
    out = layer(x)
    torch.testing.assert_close(out, ref_molora(x, base, layer, s), atol=1e-4, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-1


def test_molora_init_zero_b_leaves_base_unchanged() -> None:
    layer, base, _ = make("molora", dropout=0.3)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(D_IN)
    for t in (layer.lora_A, layer.lora_router):
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    x = torch.randn(4, 3, D_IN)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_molora_top_k_keeps_k_experts_renormalised(k: int) -> None:
    layer, base, _ = make("molora", n=4, top_k=k)
    randomise(layer)
    layer.eval()
    x = torch.randn(3, 5, D_IN)
    w = layer.expert_weights(layer.router_weights(x))
    assert ((w > 0).sum(-1) == k).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    out = layer(x)
    torch.testing.assert_close(out, ref_molora(x, base, layer, layer.scaling, top_k=k), atol=1e-4, rtol=1e-5)
    assert (out - ref_molora(x, base, layer, layer.scaling)).abs().max() > 1e-2  # differs from dense
    if k == 1:  # exactly the argmax expert, with weight 1
        e = (x @ layer.lora_router.detach().T).argmax(-1)
        r = layer.rank
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        for i, j in [(0, 0), (1, 3), (2, 4)]:
            ei = int(e[i, j])
            one = base(x[i, j]) + layer.scaling * (x[i, j] @ a[ei * r : (ei + 1) * r].T @ b[ei].T)
            torch.testing.assert_close(out[i, j], one, atol=1e-4, rtol=1e-5)


def test_molora_top_k_equal_to_num_experts_is_dense() -> None:
    dense, base, _ = make("molora", n=3)
    full, _, _ = make("molora", n=3, top_k=3)
    randomise(dense)
    full.load_state_dict(dense.state_dict())
    x = torch.randn(2, 4, D_IN)
    torch.testing.assert_close(full.eval()(x), dense.eval()(x), atol=1e-6, rtol=0)


def test_molora_router_is_fp32_under_bf16_and_autocast() -> None:
    layer, _, _ = make("molora", base_dtype=torch.bfloat16)
    randomise(layer)
    x = torch.randn(2, 3, D_IN).to(torch.bfloat16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            p = layer.router_weights(x)
        assert p.dtype == torch.float32
        expected = torch.softmax(x.float() @ layer.lora_router.detach().T, dim=-1)
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)


def test_molora_balance_loss_value_and_context_entry() -> None:
    w = 0.3
    layer, _, ctx = make("molora", n=4, balance_weight=w)
    randomise(layer, scale=0.5)
    ctx.num_layers = 5
    x = torch.randn(3, 7, D_IN)
    layer.train()
    ctx.begin(task_ids=None)
    layer(x)
    assert set(ctx.aux_losses) == {"blocks.0.up_proj.balance"}
    got = ctx.aux_losses["blocks.0.up_proj.balance"]
    expected = w * ref_cv2(x, layer.lora_router) / 5
    assert float(expected) > 1e-4  # a non-trivial imbalance
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ctx.total_aux_loss(), expected, atol=1e-6, rtol=1e-5)
    got.backward()
    assert layer.lora_router.grad.abs().max() > 0  # the loss trains the router
    # a uniform router is perfectly balanced
    with torch.no_grad():
        layer.lora_router.zero_()
    ctx.begin()
    layer(x)
    assert float(ctx.aux_losses["blocks.0.up_proj.balance"].detach()) < 1e-10
    # no loss in eval or with weight 0
    layer.eval()
    ctx.begin()
    layer(x)
    assert ctx.aux_losses == {}
    off, _, ctx0 = make("molora", n=4)
    off.train()
    off(x)
    assert ctx0.aux_losses == {}


def test_molora_cannot_merge() -> None:
    layer, base, _ = make("molora")
    randomise(layer)
    w0 = base.weight.detach().clone()
    with pytest.raises(TypeError, match=r"molora.*per-token.*cannot be merged"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=0, rtol=0)


# ---------------------------------------------------------------- merge (mergeable ones)


@pytest.mark.parametrize("method", ["multilora", "lora_split"])
def test_merge_equals_unmerged_and_unmerge_restores(method: str) -> None:
    layer, base, _ = make(method, dropout=0.2)
    randomise(layer)
    layer.eval()
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 6, D_IN)
    unmerged = layer(x).detach()
    # ΔW by loops: s Σ_i diag(v_i) B_i A_i | s Σ_j B_j A_j
    dw = torch.zeros(D_OUT, D_IN)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if method == "multilora":
        for i in range(N):
            dw += torch.diag(layer.lora_scale.detach()[i]) @ b[i] @ a[i * RANK : (i + 1) * RANK]
    else:
        rk = layer.split_rank
        for j in range(K):
            dw += b[:, j * rk : (j + 1) * rk] @ a[j * rk : (j + 1) * rk]
    dw *= layer.scaling
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- bf16, gradient checkpointing


@pytest.mark.parametrize("method", METHODS)
def test_bf16_forward_returns_bf16_close_to_fp32(method: str) -> None:
    layer, base, ctx = make(method, base_dtype=torch.bfloat16, dropout=0.1)
    randomise(layer, scale=0.3)
    ref_layer, ref_base, _ = make(method)
    ref_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 3, D_IN)
    layer.eval()
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), ref_layer.eval()(x.to(torch.bfloat16).float()), atol=0.1, rtol=0.05
    )
    layer.train()
    ctx.begin(task_ids=torch.tensor([0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for n, p in layer.named_parameters()
        if n.startswith("lora")
    )


@pytest.mark.parametrize("method", METHODS)
def test_non_reentrant_gradient_checkpointing_gives_the_same_gradients(method: str) -> None:
    kw = {"balance_weight": 0.5, "top_k": 2} if method == "molora" else {}
    grads = {}
    for ckpt in (False, True):
        layer, _, ctx = make(method, dropout=0.3, **kw)  # dropout: recomputation must replay the masks
        randomise(layer, scale=0.5)
        layer.train()
        ctx.begin(task_ids=torch.tensor([0, 1, 3]))
        x = torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(5)
        out = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        loss = out.pow(2).mean()
        if method == "molora":
            loss = loss + ctx.total_aux_loss()
        loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    assert set(grads[True]) == set(grads[False])
    for n, g in grads[False].items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(grads[True][n], g, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- config knobs


def test_constructor_rejects_bad_knobs_naming_the_key() -> None:
    cases = [
        ("multilora", {"num_loras": 0}, "adapter.num_loras=0"),
        ("lora_split", {"rank": 5, "num_splits": 2}, "adapter.rank=5.*multiple of adapter.num_splits=2"),
        ("lora_split", {"split_routing": "random"}, "adapter.split_routing='random'"),
        ("lora_split", {"split_of_task": [0, 2]}, r"adapter.split_of_task=\[0, 2\]"),
        ("molora", {"num_experts": 0}, "adapter.num_experts=0"),
        ("molora", {"top_k": 4}, "adapter.top_k=4.*num_experts=3"),
        ("molora", {"balance_weight": -1.0}, "adapter.balance_weight=-1.0"),
    ]
    for method, kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            make(method, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_yaml_composes_and_class_defaults_agree_with_it(method: str) -> None:
    cfg = compose_train([f"adapter={method}"]).adapter
    layer = ADAPTER_METHODS[method].from_config(nn.Linear(96, 96), "x", AdapterContext(), cfg)
    cls = CLASSES[method]
    for key, value in cls.spec.defaults.items():
        assert cfg.get(key) == value, key  # the yaml spells out every knob with the class default
    trimmed = OmegaConf.masked_copy(cfg, ["rank", "alpha", "dropout", "use_rslora"])
    layer2 = ADAPTER_METHODS[method].from_config(nn.Linear(96, 96), "x", AdapterContext(), trimmed)
    assert layer2.extra_repr() == layer.extra_repr()
    assert {"multilora": (3, 8), "lora_split": (4, 32), "molora": (4, 4)}[method] == (
        getattr(layer, COUNT_KEY[method]),
        layer.rank,
    )


# ---------------------------------------------------------------- on the tiny model


KINDS = {
    "multilora": {"lora_A", "lora_B", "lora_scale"},
    "lora_split": {"lora_A", "lora_B"},
    "molora": {"lora_A", "lora_B", "lora_router"},
}


@pytest.mark.parametrize("method", METHODS)
def test_inject_only_adapter_parameters_trainable(method: str) -> None:
    model, cfg, ctx = injected(method)
    base_logits = logits(build_model(cfg.model), tokens())
    layers = adapter_layers(model)
    assert layers and ctx.num_layers == len(layers)
    assert all(type(m) is CLASSES[method] and m.context is ctx for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in KINDS[method]}
    assert not model.get_input_embeddings().weight.requires_grad
    torch.testing.assert_close(logits(model, tokens()), base_logits, atol=0, rtol=0)  # zero-output init


@pytest.mark.parametrize("method", METHODS)
def test_save_load_adapter_round_trip(method: str, tmp_path: Path) -> None:
    ids = tokens()
    model, cfg, _ = injected(method, seed=0)
    for layer in adapter_layers(model).values():
        randomise(layer, seed=3, scale=0.1)
    want = logits(model, ids)
    out = save_adapter(model, tmp_path / "adapter", OmegaConf.to_container(cfg.adapter))
    saved = adapter_state_dict(model)
    assert {k.rsplit(".", 1)[-1] for k in saved} == KINDS[method]
    other, _, _ = injected(method, seed=1)
    for layer in adapter_layers(other).values():
        randomise(layer, seed=4, scale=0.1)
    assert (logits(other, ids) - want).abs().max() > 1e-3
    load_adapter(other, out)
    got = adapter_state_dict(other)
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits(other, ids), want, atol=0, rtol=0)


def test_merge_adapters_on_the_model() -> None:
    model, _, _ = injected("molora")
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)
    for method in ("multilora", "lora_split"):
        model, _, _ = injected(method)
        for layer in adapter_layers(model).values():
            randomise(layer, scale=0.1)
        want = logits(model, tokens())
        merge_adapters(model)
        torch.testing.assert_close(logits(model, tokens()), want, atol=1e-4, rtol=1e-4)


def test_meta_device_layers_build() -> None:
    with torch.device("meta"):
        base = nn.Linear(D_IN, D_OUT)
    sizes = {
        "multilora": N * RANK * D_IN + N * D_OUT * RANK + N * D_OUT,
        "lora_split": RANK * D_IN + D_OUT * RANK,
        "molora": N * RANK * D_IN + N * D_OUT * RANK + N * D_IN,
    }
    for method, cls in CLASSES.items():
        kw = {COUNT_KEY[method]: K if method == "lora_split" else N}
        layer = cls(base, "x", AdapterContext(), rank=RANK, alpha=ALPHA, **kw)
        n = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora"))
        assert n == sizes[method], method
        assert layer.lora_A.device.type == "meta"
