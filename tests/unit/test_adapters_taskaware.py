"""DoRA, MTL-LoRA and MOELoRA (docs/methods.md §5, §8) on toy layers and the tiny model: forward equations,
zero-init, DoRA merge/unmerge, mixed-task batches, per-task merged weights, missing task ids, fp32 gates,
injection, save/load, config checks.

Every expected value is computed here with explicit per-row / per-task / per-expert Python loops and
plain matmuls, independently of the layers' own (batched) code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from mtlora.adapters import (
    DoraLinear,
    MoeLoraLinear,
    TaskMixLoraLinear,
    adapter_layers,
    adapter_state_dict,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.registry import ADAPTER_METHODS
from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.models import build_model
from tests.helpers.compose import compose_train
from tests.helpers.layers import ALPHA, D_IN, D_OUT, RANK, TASKS, make, randomise
from tests.helpers.tiny import injected, logits, tokens

TASK_CLASSES = {"mtl_lora": TaskMixLoraLinear, "moelora": MoeLoraLinear}
TASK_METHODS = list(TASK_CLASSES)
ALL = {"dora": DoraLinear, **TASK_CLASSES}


def base_out(x, base: nn.Linear) -> torch.Tensor:
    return x.float() @ base.weight.detach().float().T + base.bias.detach().float()


def ids_of(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- references (explicit loops)


def dora_reference(x, base: nn.Linear, a, b, m, s: float) -> torch.Tensor:
    """W' x + bias, W' row by row: m_o (W0 + sBA)_o / ‖(W0 + sBA)_o‖."""
    w = base.weight.detach().float() + s * (b.float() @ a.float())
    wp = torch.empty_like(w)
    for o in range(w.shape[0]):
        wp[o] = m[o] * w[o] / torch.sqrt((w[o] ** 2).sum())
    return x.float() @ wp.T + base.bias.detach().float()


def mtl_reference(x, base, layer, task_ids) -> torch.Tensor:
    """Row by row: W0 x + s Σ_j softmax(w_t/τ)_j B_j Λ_t A x."""
    a, lam, bs, logits = (
        layer.lora_A.detach(),
        layer.lora_lambda.detach(),
        layer.lora_B.detach(),
        layer.lora_task_logits.detach(),
    )
    out = base_out(x, base)
    for row in range(x.shape[0]):
        t = int(task_ids[row])
        lt = lam[t] if lam.ndim == 3 else torch.diag(lam[t])
        e = torch.exp(logits[t] / layer.tau)
        w = e / e.sum()
        z = (x[row].float() @ a.T) @ lt.T
        for j in range(bs.shape[0]):
            out[row] = out[row] + layer.scaling * w[j] * (z @ bs[j].T)
    return out


def moe_reference(x, base, layer, task_ids) -> torch.Tensor:
    """Row by row: W0 x + s Σ_i softmax(W_g Emb[t])_i B_i A_i x, experts as rank blocks."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    emb, gate = layer.lora_task_embedding.detach(), layer.lora_gate.detach()
    re = layer.expert_rank
    out = base_out(x, base)
    for row in range(x.shape[0]):
        t = int(task_ids[row])
        logits = gate @ emb[t]
        w = torch.exp(logits) / torch.exp(logits).sum()
        for i in range(layer.num_experts):
            ai, bi = a[i * re : (i + 1) * re], b[:, i * re : (i + 1) * re]
            out[row] = out[row] + layer.scaling * w[i] * ((x[row].float() @ ai.T) @ bi.T)
    return out


REFS = {"mtl_lora": mtl_reference, "moelora": moe_reference}


# ---------------------------------------------------------------- forward equations


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_forward_matches_equation(rslora: bool) -> None:
    layer, base, _ = make(DoraLinear, use_rslora=rslora)
    randomise(layer, scale=0.5)
    layer.eval()
    s = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(3, 5, D_IN)
    expected = dora_reference(
        x, base, layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_magnitude.detach(), s
    )
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta(x), expected - base_out(x, base), atol=1e-5, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-2


def test_dora_train_dropout_uses_one_mask_for_both_terms() -> None:
    layer, base, _ = make(DoraLinear, dropout=0.5)
    randomise(layer, scale=0.5)
    layer.train()
    x = torch.randn(2, 7, D_IN)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    w0 = base.weight.detach()
    w = w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    c = layer.lora_magnitude.detach() / w.norm(dim=1)
    expected = (
        base_out(x, base)
        + (c - 1) * (xd @ w0.T)
        + c * layer.scaling * (xd @ layer.lora_A.detach().T @ layer.lora_B.detach().T)
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_dora_detach_norm_changes_gradients_not_values(detach: bool) -> None:
    layer, _, _ = make(DoraLinear, detach_norm=detach)
    ref, _, _ = make(DoraLinear, detach_norm=not detach)
    randomise(layer, scale=0.5)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
    layer(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    assert (layer.lora_B.grad - ref.lora_B.grad).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("method", "variant"),
    [
        ("mtl_lora", "default"),
        ("mtl_lora", "diag"),
        ("mtl_lora", "rslora"),
        ("moelora", "default"),
        ("moelora", "rslora"),
    ],
)
def test_task_aware_forward_matches_equation(method: str, variant: str) -> None:
    kw = {"lambda_format": "diag"} if variant == "diag" else {"use_rslora": variant == "rslora"}
    layer, base, ctx = make(TASK_CLASSES[method], **kw)
    randomise(layer)
    layer.eval()
    x = torch.randn(5, 6, D_IN)
    ids = ids_of(2, 0, 1, 2, 0)
    ctx.begin(task_ids=ids)
    out = layer(x)
    assert out.shape == (5, 6, D_OUT)
    torch.testing.assert_close(out, REFS[method](x, base, layer, ids), atol=1e-5, rtol=1e-5)
    assert (out - base(x)).abs().max() > 1e-2
    x2 = torch.randn(5, D_IN)  # (B, d_in) inputs work too
    torch.testing.assert_close(layer(x2), REFS[method](x2, base, layer, ids), atol=1e-5, rtol=1e-5)


def test_mtl_lora_defaults_and_init() -> None:
    layer, _, _ = make(TaskMixLoraLinear)
    assert (layer.num_up, layer.tau, layer.lambda_format) == (3, 0.1, "full")
    assert layer.lora_lambda.shape == (TASKS, RANK, RANK)
    assert torch.equal(layer.lora_lambda[1], torch.eye(RANK))
    assert layer.lora_B.shape == (3, D_OUT, RANK) and torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_task_logits.shape == (TASKS, 3)
    diag, _, _ = make(TaskMixLoraLinear, lambda_format="diag")
    assert diag.lora_lambda.shape == (TASKS, RANK) and torch.equal(diag.lora_lambda, torch.ones(TASKS, RANK))
    cfg = compose_train(["adapter=mtl_lora"]).adapter
    assert (cfg.num_up, cfg.tau, cfg.lambda_format, cfg.num_tasks) == (3, 0.1, "full", 4)


def test_moelora_experts_split_the_rank_and_gate_reads_the_task() -> None:
    layer, _, ctx = make(MoeLoraLinear, rank=6, num_experts=3)
    assert layer.expert_rank == 2 and layer.lora_A.shape == (6, D_IN) and layer.lora_B.shape == (D_OUT, 6)
    assert layer.lora_gate.shape == (3, 5) and layer.lora_task_embedding.shape == (TASKS + 1, 5)
    assert layer.lora_A.std().item() == pytest.approx(0.01, rel=0.3)  # N(0, 0.01²)
    randomise(layer)
    w = layer.gate_weights(ids_of(0, 1, 2, 1))
    assert w.dtype == torch.float32 and w.shape == (4, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    torch.testing.assert_close(w[1], w[3], atol=0, rtol=0)  # same task, same gate, whatever the token
    assert (w[0] - w[1]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="adapter.rank=6.*multiple of adapter.num_experts=4"):
        make(MoeLoraLinear, rank=6, num_experts=4)


def _masks(seed: int, shape, p: float) -> torch.Tensor:
    """The dropout masks (0 or 1/(1-p)) that a dropout call of ``shape`` draws right after ``manual_seed``."""
    torch.manual_seed(seed)
    return torch.nn.functional.dropout(torch.ones(shape), p=p, training=True)


def moe_dropout_reference(x, base, layer, task_ids, masks) -> torch.Tensor:
    """Row by row and expert by expert: W0 x + s Σ_i ω_i(t) B_i A_i (x ⊙ m_i); ``masks`` is (…, E, d_in)
    (one mask per expert) or (…, d_in) (one shared mask)."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    emb, gate = layer.lora_task_embedding.detach(), layer.lora_gate.detach()
    re, e = layer.expert_rank, layer.num_experts
    per_expert = masks.shape[-2] == e and masks.ndim == x.ndim + 1
    out = base_out(x, base)
    for row in range(x.shape[0]):
        logits = gate @ emb[int(task_ids[row])]
        w = torch.exp(logits) / torch.exp(logits).sum()
        for i in range(e):
            m = masks[row, ..., i, :] if per_expert else masks[row]
            ai, bi = a[i * re : (i + 1) * re], b[:, i * re : (i + 1) * re]
            out[row] = out[row] + layer.scaling * w[i] * (((x[row] * m) @ ai.T) @ bi.T)
    return out


@pytest.mark.parametrize("place", ["input_per_head", "input_shared"])
def test_moelora_dropout_masks_per_expert_or_shared(place: str) -> None:
    """input_per_head: an independent input mask per expert (MOELoRA's and MTL-LoRA's released code call the
    dropout inside the expert loop); input_shared: one mask for every expert (mtLoRA's copy)."""
    p, e = 0.5, 3
    layer, base, ctx = make(MoeLoraLinear, rank=6, num_experts=e, dropout=p, dropout_place=place)
    randomise(layer)
    x = torch.randn(4, 7, D_IN)
    ids = ids_of(2, 0, 1, 2)
    ctx.begin(task_ids=ids)
    layer.eval()
    clean = moe_reference(x, base, layer, ids)
    torch.testing.assert_close(layer(x), clean, atol=1e-5, rtol=1e-5)  # eval: no dropout
    layer.train()
    torch.manual_seed(11)
    out = layer(x)
    shape = (4, 7, e, D_IN) if place == "input_per_head" else (4, 7, D_IN)
    m = _masks(11, shape, p)
    torch.testing.assert_close(out, moe_dropout_reference(x, base, layer, ids, m), atol=1e-5, rtol=1e-5)
    assert (out - clean).abs().max() > 1e-2
    if place == "input_per_head":  # independent masks per expert
        assert not torch.equal(m[..., 0, :], m[..., 1, :])
        # and not the shared-mask output
        shared = moe_dropout_reference(x, base, layer, ids, _masks(11, (4, 7, D_IN), p))
        assert (out - shared).abs().max() > 1e-2
    # gradients reach A through the per-expert masks (B is trained too)
    out.sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", ["tasks_plus_one", "tasks"])
def test_moelora_task_embedding_rows_and_the_row_each_task_reads(rows: str) -> None:
    """T + 1 rows (as every released MOELoRA) or T; task t reads row t; row T is never read or trained."""
    layer, base, ctx = make(MoeLoraLinear, num_experts=2, task_embed_dim=5, task_embedding_rows=rows)
    n_rows = TASKS + 1 if rows == "tasks_plus_one" else TASKS
    assert layer.lora_task_embedding.shape == (n_rows, 5)
    randomise(layer)
    emb, gate = layer.lora_task_embedding.detach(), layer.lora_gate.detach()
    for t in range(TASKS):
        logits = gate @ emb[t]
        want = torch.exp(logits) / torch.exp(logits).sum()
        torch.testing.assert_close(layer.gate_weights(ids_of(t))[0], want, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 4, D_IN)
    ids = ids_of(0, 1, 2)
    ctx.begin(task_ids=ids)
    layer.eval()
    out = layer(x)
    torch.testing.assert_close(out, moe_reference(x, base, layer, ids), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    grad = layer.lora_task_embedding.grad
    assert (grad[:TASKS].abs().sum(-1) > 0).all()  # every task's row is trained
    if rows == "tasks_plus_one":
        assert torch.count_nonzero(grad[TASKS]) == 0  # the extra row: no gradient
        dws = [layer.merged_delta_weight(t) for t in range(TASKS)]
        with torch.no_grad():
            layer.lora_task_embedding[TASKS].add_(100.0)
        torch.testing.assert_close(layer(x), out, atol=0, rtol=0)
        for t in range(TASKS):  # the per-task merged weights do not read it either
            torch.testing.assert_close(layer.merged_delta_weight(t), dws[t], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        ctx.begin(task_ids=ids_of(0, 1, TASKS))
        layer(x)


def test_moelora_defaults_and_presets_follow_the_released_code() -> None:
    cfg = compose_train(["adapter=moelora"]).adapter
    assert (cfg.dropout_place, cfg.task_embedding_rows) == ("input_per_head", "tasks_plus_one")
    trimmed = OmegaConf.masked_copy(cfg, ["rank", "alpha", "dropout", "use_rslora", "num_tasks"])
    layer = ADAPTER_METHODS["moelora"].from_config(nn.Linear(D_IN, D_OUT), "x", AdapterContext(), trimmed)
    assert (layer.dropout_place, layer.task_embedding_rows) == ("input_per_head", "tasks_plus_one")
    for preset, place in (
        ("mtl_lora/commonsense/moelora", "input_per_head"),  # MTL-LoRA's src/adapter/moelora.py
        ("mtlora/main/mmoelora_bbh", "input_shared"),  # mtLoRA's peft/tuners/mmoelora.py
        ("mtlora/main/mmoelora_mmlu", "input_shared"),
    ):
        a = compose_train([f"experiment={preset}"]).adapter
        assert (a.method, a.dropout_place, a.task_embedding_rows) == ("moelora", place, "tasks_plus_one")


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("method", "knob"), [("mtl_lora", "num_up"), ("moelora", "num_experts")])
def test_computation_does_not_grow_with_heads_or_tasks(method: str, knob: str) -> None:
    """A Python loop over up-projections / experts / rows would issue more torch calls as they grow."""
    counts = []
    for n, tasks, rows in ((2, 2, 2), (4, 5, 7)):
        layer, _, ctx = make(TASK_CLASSES[method], num_tasks=tasks, dropout=0.1, **{knob: n})
        randomise(layer)
        x = torch.randn(rows, 3, D_IN)
        ctx.begin(task_ids=torch.arange(rows) % tasks)
        for mode in (layer.train, layer.eval):
            mode()
            with _CountCalls() as c:
                layer(x).sum().backward()
            counts.append(c.calls)
    assert counts[:2] == counts[2:], counts


# ---------------------------------------------------------------- zero init


@pytest.mark.parametrize("method", list(ALL))
def test_zero_init_leaves_base_output_unchanged(method: str) -> None:
    layer, base, ctx = make(ALL[method], dropout=0.3)
    x = torch.randn(4, 5, D_IN)
    ctx.begin(task_ids=ids_of(0, 1, 2, 1))
    layer.eval()
    torch.testing.assert_close(layer(x), base(x), atol=1e-5 if method == "dora" else 0, rtol=0)
    if method == "dora":  # m = ‖W0‖_row
        torch.testing.assert_close(layer.lora_magnitude.detach(), base.weight.detach().norm(dim=1))
        layer.train()  # with B = 0, c = 1 exactly: dropout does not move the output either
        torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=0)
    else:
        layer.train()
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


# ---------------------------------------------------------------- DoRA merge


def test_dora_merge_equals_unmerged_and_unmerge_restores() -> None:
    layer, base, _ = make(DoraLinear, dropout=0.2)
    randomise(layer, scale=0.5)
    layer.eval()
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 6, D_IN)
    unmerged = layer(x).detach()
    dw = layer.delta_weight().detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    # while merged, ΔW is still taken relative to W0 (not the merged weight)
    torch.testing.assert_close(layer.delta_weight(), dw, atol=1e-6, rtol=0)
    layer.merge()  # idempotent
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-6, rtol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.merge()  # a second cycle gives the same weight
    torch.testing.assert_close(base.weight.detach(), w0 + dw, atol=1e-6, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- mixed-task batches


@pytest.mark.parametrize("method", TASK_METHODS)
def test_mixed_task_batch_rows_equal_single_row_batches(method: str) -> None:
    layer, _, ctx = make(TASK_CLASSES[method])
    randomise(layer)
    layer.eval()
    x = torch.randn(6, 4, D_IN)
    ids = ids_of(0, 2, 1, 1, 0, 2)
    ctx.begin(task_ids=ids)
    mixed = layer(x)
    for row in range(6):
        ctx.begin(task_ids=ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], layer(x[row : row + 1]), atol=1e-6, rtol=1e-6)
    # the task id matters: another id changes the row
    ctx.begin(task_ids=ids_of(1))
    assert (layer(x[:1]) - mixed[:1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", TASK_METHODS)
def test_per_task_merged_delta_weight_reproduces_the_unmerged_output(method: str) -> None:
    layer, base, ctx = make(TASK_CLASSES[method])
    randomise(layer)
    layer.eval()
    x = torch.randn(3, 5, D_IN)
    for t in range(TASKS):
        ctx.begin(task_ids=ids_of(t, t, t))
        want = layer(x)
        dw = layer.merged_delta_weight(t)
        assert dw.shape == (D_OUT, D_IN)
        torch.testing.assert_close(base(x) + x @ dw.T, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="task id 3"):
        layer.merged_delta_weight(TASKS)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_whole_model_merge_raises(method: str) -> None:
    layer, base, _ = make(TASK_CLASSES[method])
    assert not layer.mergeable and layer.needs_task_ids
    w0 = base.weight.detach().clone()
    with pytest.raises(TypeError, match=rf"{method}.*cannot be merged.*merged_delta_weight"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=0, rtol=0)


# ---------------------------------------------------------------- task ids: missing / malformed


@pytest.mark.parametrize("method", TASK_METHODS)
def test_missing_task_ids_raise_a_clear_error(method: str) -> None:
    layer, _, ctx = make(TASK_CLASSES[method])
    x = torch.randn(2, 3, D_IN)
    for mode in (layer.train, layer.eval):
        mode()
        ctx.begin()
        with pytest.raises(ValueError, match=rf"adapter.method={method}.*needs task ids"):
            layer(x)
    ctx.begin(task_ids=ids_of(0, 1, 2))
    with pytest.raises(ValueError, match="task ids must have shape"):
        layer(x)
    ctx.begin(task_ids=ids_of(0, TASKS))
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        layer(x)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("method", list(ALL))
def test_bf16_base_with_fp32_adapter_and_autocast(method: str) -> None:
    layer, base, ctx = make(ALL[method], dropout=0.1)
    layer.base_layer.to(torch.bfloat16)
    if method == "dora":
        layer.reset_parameters()
    assert {p.dtype for n, p in layer.named_parameters() if n.startswith("lora")} == {torch.float32}
    randomise(layer, scale=0.3)
    ctx.begin(task_ids=ids_of(0, 2))
    x = torch.randn(2, 3, D_IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    if method != "dora":
        w = layer.mixing_weights(ids_of(0, 2)) if method == "mtl_lora" else layer.gate_weights(ids_of(0, 2))
        assert w.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.float())
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["adapter=mtl_lora", "adapter.num_tasks=3"],
            "adapter.num_tasks=3: must equal the number of data tasks, 4",
        ),
        (
            ["adapter=moelora", "data.select=[arithmetic,counting]", "adapter.num_tasks=4"],
            "adapter.num_tasks=4: must equal",
        ),
        (["adapter=mtl_lora", "~adapter.num_tasks"], "adapter.num_tasks: missing"),
        (["adapter=mtl_lora", "adapter.lambda_format=lowrank"], "adapter.lambda_format='lowrank'"),
        (["adapter=mtl_lora", "adapter.tau=0"], "adapter.tau=0"),
        (["adapter=mtl_lora", "adapter.num_up=0"], "adapter.num_up=0"),
        (
            ["adapter=moelora", "adapter.num_experts=3"],
            "adapter.rank=8: must be a multiple of adapter.num_experts=3",
        ),
        (["adapter=dora", "adapter.detach_norm=1"], "adapter.detach_norm=1"),
        (
            ["adapter=moelora", "adapter.dropout_place=A_out_per_head"],
            "adapter.dropout_place='A_out_per_head'",
        ),
        (["adapter=moelora", "adapter.task_embedding_rows=all"], "adapter.task_embedding_rows='all'"),
    ],
)
def test_bad_task_aware_values_name_the_key(overrides: list[str], expected: str, tmp_path: Path) -> None:
    cfg = compose_train(overrides, run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert expected in str(e.value)


def test_matching_num_tasks_validates(tmp_path: Path) -> None:
    for method in ("dora", *TASK_METHODS):
        validate_config(compose_train([f"adapter={method}"], run_dir=tmp_path))
    validate_config(
        compose_train(
            ["adapter=mtl_lora", "adapter.num_tasks=2", "data.select=[counting,arithmetic]"], run_dir=tmp_path
        )
    )


# ---------------------------------------------------------------- on the tiny model


#: the task of each row of ``tokens(rows=3)``
TASK_IDS = ids_of(0, 3, 1)


KINDS = {
    "dora": ["lora_A", "lora_B", "lora_magnitude"],
    "mtl_lora": ["lora_A", "lora_B", "lora_lambda", "lora_task_logits"],
    "moelora": ["lora_A", "lora_B", "lora_task_embedding", "lora_gate"],
}


@pytest.mark.parametrize("method", list(ALL))
def test_inject_only_adapter_parameters_trainable(method: str) -> None:
    model, cfg, ctx = injected(method)
    base_logits = logits(build_model(cfg.model), tokens(rows=3))
    layers = adapter_layers(model)
    assert layers and all(type(m) is ALL[method] and m.context is ctx for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in KINDS[method]}
    assert all(not m.base_layer.weight.requires_grad for m in layers.values())
    assert not model.get_input_embeddings().weight.requires_grad
    torch.testing.assert_close(logits(model, tokens(rows=3), TASK_IDS), base_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(ALL))
def test_save_load_adapter_round_trip(method: str, tmp_path: Path) -> None:
    ids = tokens(rows=3)
    model, cfg, _ = injected(method, seed=0)
    for layer in adapter_layers(model).values():
        randomise(layer, seed=3, scale=0.1)
    want = logits(model, ids, TASK_IDS)
    out = save_adapter(model, tmp_path / "adapter", OmegaConf.to_container(cfg.adapter))
    saved = adapter_state_dict(model)
    assert {k.rsplit(".", 1)[-1] for k in saved} == set(KINDS[method])
    other, _, _ = injected(method, seed=1)
    for layer in adapter_layers(other).values():
        randomise(layer, seed=4, scale=0.1)
    assert (logits(other, ids, TASK_IDS) - want).abs().max() > 1e-3
    load_adapter(other, out)
    got = adapter_state_dict(other)
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits(other, ids, TASK_IDS), want, atol=0, rtol=0)


def test_merge_adapters_on_the_model() -> None:
    model, _, _ = injected("dora")
    for layer in adapter_layers(model).values():
        randomise(layer, scale=0.1)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in adapter_layers(model).items()}
    want = logits(model, tokens(rows=3), TASK_IDS)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, tokens(rows=3), TASK_IDS), want, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    for n, m in adapter_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight.detach(), w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, tokens(rows=3), TASK_IDS), want, atol=1e-5, rtol=1e-5)
    for method in TASK_METHODS:
        model, _, _ = injected(method)
        with pytest.raises(TypeError, match="cannot be merged"):
            merge_adapters(model)


def test_registry_and_meta_device_layers_build() -> None:
    assert {"dora", "mtl_lora", "moelora"} <= set(ADAPTER_METHODS)
    with torch.device("meta"):
        base = nn.Linear(D_IN, D_OUT)
    ctx = AdapterContext()
    n = lambda layer: sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora"))  # noqa: E731
    assert n(DoraLinear(base, "x", ctx, rank=RANK, alpha=ALPHA)) == RANK * (D_IN + D_OUT) + D_OUT
    mtl = TaskMixLoraLinear(base, "x", ctx, rank=RANK, alpha=ALPHA, num_tasks=TASKS)
    assert n(mtl) == RANK * D_IN + TASKS * RANK * RANK + 3 * D_OUT * RANK + TASKS * 3
    moe = MoeLoraLinear(
        base, "x", ctx, rank=RANK, alpha=ALPHA, num_tasks=TASKS, num_experts=2, task_embed_dim=5
    )
    assert n(moe) == RANK * (D_IN + D_OUT) + (TASKS + 1) * 5 + 2 * 5  # T + 1 embedding rows
    moe_t = MoeLoraLinear(
        base,
        "x",
        ctx,
        rank=RANK,
        alpha=ALPHA,
        num_tasks=TASKS,
        num_experts=2,
        task_embed_dim=5,
        task_embedding_rows="tasks",
    )
    assert n(moe_t) == RANK * (D_IN + D_OUT) + TASKS * 5 + 2 * 5


@pytest.mark.parametrize("name", ["mtl_lora", "moelora"])
def test_num_tasks_follows_the_data_mixture(name, tmp_path):
    from mtlora.config import validate_config

    for overrides, n in ([[], 4], [["data=flan_cot"], 7], [["data.select=[arithmetic,counting]"], 2]):
        cfg = compose_train([f"adapter={name}", *overrides], run_dir=tmp_path)
        validate_config(cfg)
        assert cfg.adapter.num_tasks == n
