"""Per-task merge of MTL-LoRA and MOELoRA (docs/methods.md §5, §8): ``merge(task_id=t)`` folds
``ΔW_t`` into the base weight, the merged forward equals the unmerged one on rows of task ``t``, rows of
other tasks are refused, ``unmerge`` restores ``W0``; the model-level ``merge_adapters(model, task_id=t)``.

``ΔW_t`` is recomputed here with explicit per-up-projection / per-expert loops of plain matmuls:
MTL-LoRA ``s Σ_j softmax(w_t/τ)_j B_j Λ_t A``, MOELoRA ``s Σ_i softmax(W_g Emb[t])_i B_i A_i``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlora.adapters import (
    MoeLoraLinear,
    TaskMixLoraLinear,
    adapter_layers,
    merge_adapters,
    unmerge_adapters,
)
from mtlora.eval.generate import greedy_generate, needs_task_ids
from mtlora.models import build_tokenizer
from tests.helpers.compose import compose_train
from tests.helpers.layers import D_IN, D_OUT, TASKS, randomise
from tests.helpers.layers import make as make_layer
from tests.helpers.tiny import injected, logits, randomise_adapters, tokens

CLASSES = {"mtl_lora": TaskMixLoraLinear, "moelora": MoeLoraLinear}
METHODS = list(CLASSES)


def make(method: str, seed: int = 0):
    """A toy layer of ``method`` away from its init (B = 0), as training would leave it, in eval mode."""
    layer, base, ctx = make_layer(CLASSES[method], seed)
    randomise(layer, seed + 1)
    return layer.eval(), base, ctx


def reference_delta(layer, t: int) -> torch.Tensor:
    """``ΔW_t`` by explicit loops (module doc)."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    dw = torch.zeros(D_OUT, D_IN)
    if isinstance(layer, TaskMixLoraLinear):
        lam = layer.lora_lambda.detach()[t]
        lam = lam if lam.ndim == 2 else torch.diag(lam)
        e = torch.exp(layer.lora_task_logits.detach()[t] / layer.tau)
        for j in range(layer.num_up):
            dw += (e[j] / e.sum()) * (b[j] @ lam @ a)
    else:
        logits = layer.lora_gate.detach() @ layer.lora_task_embedding.detach()[t]
        w = torch.exp(logits) / torch.exp(logits).sum()
        re = layer.expert_rank
        for i in range(layer.num_experts):
            dw += w[i] * (b[:, i * re : (i + 1) * re] @ a[i * re : (i + 1) * re])
    return layer.scaling * dw


def ids_of(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", range(TASKS))
def test_merged_forward_equals_unmerged_for_rows_of_the_task(method: str, t: int) -> None:
    layer, base, ctx = make(method)
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 5, D_IN)
    ctx.begin(task_ids=ids_of(t, t, t))
    want = layer(x).detach()
    assert (want - base(x)).abs().max() > 1e-2  # the adapter moves the output
    layer.merge(task_id=t)
    assert layer.merged and layer.merged_task == t
    torch.testing.assert_close(base.weight.detach(), w0 + reference_delta(layer, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), want, atol=1e-5, rtol=1e-5)  # the merged weight alone
    ctx.begin()  # merged: task ids are optional
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    layer.merge(task_id=t)  # idempotent
    torch.testing.assert_close(base.weight.detach(), w0 + reference_delta(layer, t), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged and layer.merged_task is None
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    ctx.begin(task_ids=ids_of(t, t, t))
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_rows_of_another_task_are_refused_while_merged(method: str) -> None:
    layer, base, ctx = make(method)
    x = torch.randn(3, 5, D_IN)
    layer.merge(task_id=1)
    for ids in (ids_of(0, 0, 0), ids_of(1, 2, 1)):
        ctx.begin(task_ids=ids)
        with pytest.raises(ValueError, match=rf"adapter.method={method}.*merged for task 1.*got task ids"):
            layer(x)
    ctx.begin(task_ids=ids_of(1, 1))  # malformed ids are still caught
    with pytest.raises(ValueError, match="task ids must have shape"):
        layer(x)
    w = base.weight.detach().clone()
    with pytest.raises(ValueError, match="merged for task 1; unmerge"):
        layer.merge(task_id=2)
    torch.testing.assert_close(base.weight.detach(), w, atol=0, rtol=0)
    assert layer.merged_task == 1


@pytest.mark.parametrize("method", METHODS)
def test_merge_needs_a_valid_task_id(method: str) -> None:
    layer, base, _ = make(method)
    w0 = base.weight.detach().clone()
    with pytest.raises(TypeError, match=r"cannot be merged for all tasks.*merge\(task_id=t\)"):
        layer.merge()
    for bad in (TASKS, -1, True, 1.0):
        with pytest.raises(ValueError, match="not in"):
            layer.merge(task_id=bad)
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=0, rtol=0)


def test_bf16_base_weight_merges_within_bf16_rounding() -> None:
    layer, base, ctx = make("mtl_lora")
    base.to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    x = torch.randn(2, 4, D_IN, dtype=torch.bfloat16)
    ctx.begin(task_ids=ids_of(2, 2))
    want = layer(x).float()
    layer.merge(task_id=2)
    assert base.weight.dtype == torch.bfloat16
    assert (layer(x).float() - want).abs().max() < 0.02 * want.abs().max()  # bf16: ~3 significant digits
    layer.unmerge()
    # two roundings of W0 + ΔW_t to bf16 (8 significant bits): off by at most 2·2⁻⁸·|W0 + ΔW_t|
    bound = 2 * 2**-8 * (w0.float().abs() + reference_delta(layer, 2).abs()).max()
    assert (base.weight.detach().float() - w0.float()).abs().max() <= bound


# ---------------------------------------------------------------- the model-level entry, tiny model


#: three rows of tokens for the model-level checks
IDS = tokens(rows=3)


def trained_like(method: str) -> nn.Module:
    """The tiny model with ``conf/adapter/<method>.yaml`` moved away from its init (B = 0), in eval mode."""
    model, _, _ = injected(method)
    randomise_adapters(model, seed=3, scale=0.1)
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_merge_adapters_for_one_task_on_the_model(method: str) -> None:
    model = trained_like(method)
    layers = adapter_layers(model)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    num_tasks = next(iter(layers.values())).num_tasks
    want = {t: logits(model, IDS, torch.full((3,), t)) for t in range(num_tasks)}
    assert (want[0] - want[1]).abs().max() > 1e-3  # the task matters
    with pytest.raises(TypeError, match=r"cannot be merged for all tasks.*task_id=t"):
        merge_adapters(model)
    with pytest.raises(ValueError, match="not in"):
        merge_adapters(model, task_id=num_tasks)
    assert not any(m.merged for m in layers.values())  # all or nothing
    for t in (1, num_tasks - 1):
        merge_adapters(model, task_id=t)
        assert all(m.merged_task == t for m in layers.values()) and not needs_task_ids(model)
        torch.testing.assert_close(logits(model, IDS, torch.full((3,), t)), want[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(model, IDS, None), want[t], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=f"merged for task {t}"):
            logits(model, IDS, torch.tensor([t, 0, t]))
        with pytest.raises(ValueError, match=f"merged for task {t}; unmerge_adapters"):
            merge_adapters(model, task_id=0)
        unmerge_adapters(model)
        for n, m in layers.items():
            torch.testing.assert_close(m.base_layer.weight.detach(), w0[n], atol=1e-6, rtol=0)
        assert needs_task_ids(model)
    torch.testing.assert_close(logits(model, IDS, torch.full((3,), 0)), want[0], atol=1e-5, rtol=1e-5)


def test_task_id_is_refused_for_adapters_without_tasks() -> None:
    model = trained_like("lora")
    with pytest.raises(ValueError, match="task_id=0: only task-aware adapters"):
        merge_adapters(model, task_id=0)
    assert not any(m.merged for m in adapter_layers(model).values())


def test_merged_model_generates_like_the_unmerged_one_for_its_task(tmp_path) -> None:
    """Greedy generation (KV cache, left padding) merged for task 2 without task ids equals the unmerged
    model given task id 2 for every prompt; rows of another task are refused."""
    model = trained_like("mtl_lora")
    tok = build_tokenizer(compose_train(["debug=smoke"]).model)
    prompts = ["Q: 12+7=", "Sort the words: pear apple fig\nA:", "x"]

    def gen(task_ids):
        return greedy_generate(model, tok, prompts, 6, task_ids=task_ids, progress=False, return_ids=True)

    want = gen(2)
    assert want != gen(0)  # the task matters
    merge_adapters(model, task_id=2)
    assert gen(None) == want and gen(2) == want
    with pytest.raises(ValueError, match="merged for task 2"):
        gen(0)
