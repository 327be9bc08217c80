"""The diagnostics of ``mtlora.diagnostics`` against hand computations and independent NumPy code."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from mtlora.adapters import inject_adapters
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import LoraLinear
from mtlora.adapters.moelora import MoeLoraLinear
from mtlora.adapters.molora import MoLoraLinear
from mtlora.adapters.multihead import HydraLoraLinear, MLoraLinear, RLoraLinear
from mtlora.adapters.multilora import MultiLoraLinear
from mtlora.adapters.task_mix import TaskMixLoraLinear
from mtlora.config import validate_config
from mtlora.data import build_data
from mtlora.diagnostics import DIAGNOSTICS, DiagnosticsRunner, check_diagnostics_config
from mtlora.diagnostics.common import collate_prompts, mixed_batches, pooled_prompt_batches
from mtlora.diagnostics.compare import compare_conflict, compare_heads
from mtlora.diagnostics.config import check_diagnostics_hardware
from mtlora.diagnostics.conflict import (
    conflict_stats,
    cosine_drop_pct,
    gradient_conflict,
    lm_loss,
    noise_floor_check,
)
from mtlora.diagnostics.divergence import collect_representations, representation_divergence
from mtlora.diagnostics.heads import (
    INIT_FILE,
    head_cosine_matrix,
    head_similarity,
    load_initial_heads,
    mean_offdiagonal,
    save_initial_heads,
)
from mtlora.diagnostics.routing import cv_squared, routing_stats, token_entropy
from mtlora.diagnostics.spectral import band_alignment, band_indices, head_svd, spectral_stats, sv_importance
from mtlora.diagnostics.tsne import parameter_points
from mtlora.errors import ConfigError
from mtlora.losses.alignment import gaussian_kl, mmd
from mtlora.models import build_model, build_tokenizer
from tests.helpers.compose import compose_train

# ---------------------------------------------------------------- toy models


class ToyLM(nn.Module):
    """Embedding → one adapter layer → logits, with the adapter context of an injected model."""

    def __init__(self, layer_cls=HydraLoraLinear, vocab: int = 12, d: int = 6, **kw) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.adapter_context = AdapterContext()
        self.emb = nn.Embedding(vocab, d)
        block = nn.Module()
        block.mlp = nn.Module()  # module path layers.0.mlp.up_proj, as in a decoder
        block.mlp.up_proj = layer_cls(nn.Linear(d, vocab), "layers.0.mlp.up_proj", self.adapter_context, **kw)
        self.layers = nn.ModuleList([block])
        for p in [*self.emb.parameters(), *self.layer.base_layer.parameters()]:
            p.requires_grad_(False)

    @property
    def layer(self):
        return self.layers[0].mlp.up_proj

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.layer(self.emb(input_ids)))


def hydra_toy(num_heads: int = 3, rank: int = 2) -> ToyLM:
    return ToyLM(HydraLoraLinear, rank=rank, alpha=4, num_heads=num_heads)


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose_train(["data.select=[arithmetic,word_sorting]"])


def tiny_lora(cfg):
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    return model


def _np_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b)))


# ---------------------------------------------------------------- inter-head similarity


def test_identical_heads_have_similarity_one_and_orthogonal_heads_zero() -> None:
    h = torch.randn(5, 3)
    assert mean_offdiagonal(head_cosine_matrix(torch.stack([h, h, 2 * h]))) == pytest.approx(1.0)
    e = torch.eye(4).reshape(4, 2, 2)  # four flattened one-hot heads
    assert mean_offdiagonal(head_cosine_matrix(e)) == pytest.approx(0.0, abs=1e-12)
    assert mean_offdiagonal(head_cosine_matrix(torch.stack([h, -h]))) == pytest.approx(-1.0)


def test_head_similarity_of_a_model_matches_numpy_cosines() -> None:
    model = hydra_toy(num_heads=3)
    layer = model.layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    b = layer.lora_B.detach().numpy()
    expected = np.mean([_np_cos(b[i], b[j]) for i in range(3) for j in range(i + 1, 3)])
    res = head_similarity(model)
    assert res["layers"]["layers.0.mlp.up_proj"]["similarity"] == pytest.approx(expected, abs=1e-9)
    e = res["by_module"]["up_proj"]
    assert e["layer"] == [0] and e["similarity"] == [pytest.approx(expected, abs=1e-9)]
    with torch.no_grad():
        layer.lora_B.copy_(layer.lora_B[0].expand_as(layer.lora_B))
    assert head_similarity(model)["mean"] == pytest.approx(1.0)
    with torch.no_grad():
        layer.lora_B.zero_()  # HydraLoRA's init: no cosine is defined
    assert head_similarity(model)["mean"] is None


def test_head_similarity_does_not_apply_to_plain_lora() -> None:
    assert head_similarity(ToyLM(LoraLinear, rank=2, alpha=4)) is None


def _np_cos_matrix(mats: list[np.ndarray]) -> np.ndarray:
    v = np.stack([m.ravel().astype(np.float64) for m in mats])
    n = np.linalg.norm(v, axis=1)
    return (v @ v.T) / np.outer(n, n)


def _np_mean_upper(m: np.ndarray) -> float:
    return float(m[np.triu_indices(len(m), 1)].mean())


def test_molora_heads_with_equal_b_and_orthogonal_a_do_not_look_alike() -> None:
    """MoLoRA heads own their A_i: equal B_i with A_i on disjoint input coordinates give updates
    ΔW_i = B_i A_i with disjoint column supports, cosine 0 — comparing the raw B_i would say 1."""
    model = ToyLM(MoLoraLinear, rank=2, alpha=4, num_experts=2)
    layer = model.layer
    b = torch.randn(12, 2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.stack([b, b]))
        layer.lora_A.copy_(torch.eye(6)[:4])  # A_0 = rows e_0, e_1; A_1 = rows e_2, e_3
    res = head_similarity(model)
    assert res["quantity"] == "B_i A_i"
    assert res["mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["mean_delta_w"] == pytest.approx(0.0, abs=1e-12)
    # generic weights: the cosine of the flattened products B_i A_i, computed with NumPy
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
    bb, aa = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy().reshape(2, 2, 6)
    expected = _np_mean_upper(_np_cos_matrix([bb[i] @ aa[i] for i in range(2)]))
    assert head_similarity(model)["mean"] == pytest.approx(expected, abs=1e-9)


def test_multilora_compares_its_scaled_updates_and_starts_without_a_cosine() -> None:
    """MultiLoRA's heads add diag(v_i) B_i A_i; v = 0 at init, so no head has contributed yet."""
    model = ToyLM(MultiLoraLinear, rank=2, alpha=4, num_loras=3)
    layer = model.layer
    res = head_similarity(model)
    assert (
        res["quantity"] == "diag(v_i) B_i A_i" and res["mean"] is None
    )  # the random B_i alone: not compared
    with torch.no_grad():
        layer.lora_scale.copy_(torch.randn_like(layer.lora_scale))
    v = layer.lora_scale.detach().double().numpy()
    bb, aa = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy().reshape(3, 2, 6)
    expected = _np_mean_upper(_np_cos_matrix([np.diag(v[i]) @ bb[i] @ aa[i] for i in range(3)]))
    assert head_similarity(model)["mean"] == pytest.approx(expected, abs=1e-9)


def test_moelora_experts_are_compared_as_their_block_updates() -> None:
    model = ToyLM(MoeLoraLinear, rank=4, alpha=4, num_tasks=2, num_experts=2)
    layer = model.layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    bb, aa = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy()
    updates = [bb[:, 2 * i : 2 * i + 2] @ aa[2 * i : 2 * i + 2] for i in range(2)]
    res = head_similarity(model)
    assert res["quantity"] == "B_i A_i"
    assert res["mean"] == pytest.approx(_np_mean_upper(_np_cos_matrix(updates)), abs=1e-9)


def test_shared_a_heads_compare_b_and_also_report_their_updates() -> None:
    model = hydra_toy(num_heads=3)
    layer = model.layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    bb, a = layer.lora_B.detach().double().numpy(), layer.lora_A.detach().double().numpy()
    res = head_similarity(model)
    assert res["quantity"] == "B_i"
    assert res["mean"] == pytest.approx(_np_mean_upper(_np_cos_matrix(list(bb))), abs=1e-9)
    assert res["mean_delta_w"] == pytest.approx(_np_mean_upper(_np_cos_matrix([h @ a for h in bb])), abs=1e-9)
    assert res["init"] == "unknown" and res["mean_increment"] is None


@pytest.mark.parametrize("layer_cls", [RLoraLinear, MLoraLinear])
def test_random_init_heads_report_the_similarity_of_the_learned_increments(layer_cls, tmp_path) -> None:
    """Independent random heads B_i(0) plus one identical learned change D: cos(B − B₀) = 1 whatever the
    size of D, while the raw similarity goes from the init's (≈ 0) toward 1 as D grows."""
    model = ToyLM(layer_cls, rank=2, alpha=4, num_heads=3)
    layer = model.layer
    assert save_initial_heads(model, tmp_path) == tmp_path / INIT_FILE
    init = load_initial_heads(tmp_path)
    b0 = layer.lora_B.detach().clone()
    assert torch.equal(init["layers.0.mlp.up_proj"].up.float(), b0)
    d = torch.randn(12, 2)
    d /= d.norm()
    raw = []
    for size in (1e-3 * b0[0].norm(), 30 * b0.norm()):  # b0.norm(): the released init scales heads apart
        with torch.no_grad():
            layer.lora_B.copy_(b0 + size * d)
        res = head_similarity(model, init)
        # B is stored in fp32: b0 + D rounds to ~6e-8·|b0|, which at |D| = 1e-3·|b0| moves the cosine by
        # ~1e-7 (the released init makes b0 tiny, so the bound is relative to it, not to 1)
        assert res["mean_increment"] == pytest.approx(1.0, abs=1e-6)
        heads = layer.lora_B.detach().numpy()
        assert res["mean"] == pytest.approx(_np_mean_upper(_np_cos_matrix(list(heads))), abs=1e-9)
        raw.append(res["mean"])
    assert raw[0] < 0.5 < 0.99 < raw[1]  # the raw number measures init size vs learned change
    # written once: a resumed run keeps the initial heads of its first start
    assert save_initial_heads(model, tmp_path) is None
    assert torch.equal(load_initial_heads(tmp_path)["layers.0.mlp.up_proj"].up.float(), b0)


def test_zero_init_heads_are_listed_not_stored_and_their_increment_is_the_raw_similarity(tmp_path) -> None:
    model = hydra_toy(num_heads=3)
    save_initial_heads(model, tmp_path)
    init = load_initial_heads(tmp_path)
    assert init == {"layers.0.mlp.up_proj": None}
    with torch.no_grad():
        model.layer.lora_B.copy_(torch.randn_like(model.layer.lora_B))
    res = head_similarity(model, init)
    assert res["init"] == "saved" and res["mean_increment"] == res["mean"]
    assert save_initial_heads(ToyLM(LoraLinear, rank=2, alpha=4), tmp_path / "lora") is None  # no heads
    assert load_initial_heads(tmp_path / "lora") is None


def test_a_cross_method_comparison_uses_one_quantity() -> None:
    def rec(quantity, sim, dw):
        return {
            "quantity": quantity,
            "mean": sim,
            "mean_delta_w": dw,
            "by_module": {"up_proj": {"layer": [0], "similarity": [sim], "delta_w": [dw]}},
        }

    same = compare_heads({"hydra": rec("B_i", 0.9, 0.5), "rlora": rec("B_i", 0.1, 0.2)})
    assert same["quantity"] == "B_i" and [r["mean"] for r in same["runs"].values()] == [0.9, 0.1]
    mixed = compare_heads({"hydra": rec("B_i", 0.9, 0.5), "molora": rec("B_i A_i", 0.0, 0.0)})
    assert mixed["key"] == "delta_w" and [r["mean"] for r in mixed["runs"].values()] == [0.5, 0.0]
    assert mixed["runs"]["hydra"]["by_module"]["up_proj"]["value"] == [0.5]


# ---------------------------------------------------------------- gradient conflict


def test_conflict_stats_on_a_hand_made_matrix() -> None:
    m = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, -0.4], [-0.2, -0.4, 1.0]])
    s = conflict_stats(m)
    assert s["pairs"] == 3 and "mean" not in s  # named so that its sign reads one way: a cosine
    assert s["mean_cosine"] == pytest.approx((0.5 - 0.2 - 0.4) / 3)
    assert s["std"] == pytest.approx(np.std([0.5, -0.2, -0.4]))
    assert s["max_cosine"] == 0.5
    assert s["conflict_ratio"] == pytest.approx(2 / 3)


def test_cosine_drop_is_mtloras_reduction_and_undefined_for_a_non_positive_reference() -> None:
    assert cosine_drop_pct(0.5, 0.1) == pytest.approx(80.0)  # figS3: (comp − block) / comp × 100
    assert cosine_drop_pct(0.2, 0.3) == pytest.approx(-50.0)
    # a reference mean ≤ 0 would flip the sign: −0.5 → −0.1 is *more* similar, yet the ratio says +80 %
    assert cosine_drop_pct(-0.5, -0.1) is None and cosine_drop_pct(0.0, 0.1) is None
    assert cosine_drop_pct(None, 0.1) is None


def test_noise_floor_check_by_hand() -> None:
    m = np.array([[1.0, 0.2, -0.1], [0.2, 1.0, 0.05], [-0.1, 0.05, 1.0]])
    ok, note = noise_floor_check(m, [0.6, 0.5, 0.4])
    assert ok is True and "above every cross-task cosine (max 0.200)" in note
    ok, note = noise_floor_check(m, [0.6, 0.15, 0.4])  # task 1's halves agree less than tasks 0 and 1
    assert ok is False and "NOT above" in note and "diagnostics.conflict.batches_per_task" in note
    assert noise_floor_check(m, [None, None, None])[0] is None


def _answer_batch(answer: int, task: int, seed: int, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(40, 120, (n, 10), generator=g), torch.full((n, 1), answer)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = answer
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "task_ids": torch.full((n,), task),
    }


def _flat_grad(model, batches: list[dict], params: list[torch.Tensor]) -> np.ndarray:
    """Mean gradient of ``lm_loss`` over ``batches`` w.r.t. ``params``, flattened (float64)."""
    total = None
    for b in batches:
        g = torch.autograd.grad(lm_loss(model, b), params, allow_unused=True)
        v = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)])
        total = v.double() if total is None else total + v.double()
    return (total / len(batches)).numpy()


def test_two_copies_of_one_task_agree_and_contradicting_targets_conflict(tiny_cfg) -> None:
    model = tiny_lora(tiny_cfg).eval()
    a, b = 65, 66  # same prompts; the answers "A" and "B"
    copies = {
        0: [_answer_batch(a, 0, 1), _answer_batch(a, 0, 2)],
        1: [_answer_batch(a, 1, 1), _answer_batch(a, 1, 2)],
    }
    res = gradient_conflict(model, copies, ["t", "t_copy"])
    assert res["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and res["conflict_ratio"] == 0.0
    assert all(v["mean_cosine"] == pytest.approx(1.0, abs=1e-5) for v in res["per_module"].values())
    assert len(res["per_module"]) == 14  # 7 target modules x 2 layers
    # two copies of one task: the cosine (1) is not above the floor of two halves of different rows
    assert res["noise_floor"]["above_cross"] is False and res["noise_floor"]["min"] < 1.0
    other_rows = gradient_conflict(model, {0: [_answer_batch(a, 0, 1)], 1: [_answer_batch(a, 1, 3)]})
    assert 0.0 < other_rows["mean_cosine"] < 1.0 - 1e-6  # same task, other prompts: agree, not identical
    assert other_rows["noise_floor"]["above_cross"] is None  # one batch per task: no halves

    # fit the mixture of the two contradicting tasks: the model then splits its mass between A and B, and
    # each task's gradient pushes toward its own answer, against the other's
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(12):
        loss = lm_loss(model, _answer_batch(a, 0, 1)) + lm_loss(model, _answer_batch(b, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    rows = {
        0: [_answer_batch(a, 0, 1), _answer_batch(a, 0, 2)],
        1: [_answer_batch(b, 1, 1), _answer_batch(b, 1, 2)],
    }
    res = gradient_conflict(model, rows)
    assert res["mean_cosine"] < -0.5 and res["conflict_ratio"] == 1.0
    assert np.allclose(np.diag(res["matrix"]), 1.0)
    assert res["noise_floor"]["above_cross"] is True  # each task's halves agree, the tasks oppose
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched


def test_per_layer_results_are_keyed_by_transformer_layer_and_the_floor_is_the_halves_cosine(
    tiny_cfg,
) -> None:
    """per_layer[ℓ] = cosine of the concatenated gradients of all adapter parameters of decoder layer ℓ;
    the noise floor = cosine of the mean gradients of the first and second half of a task's batches."""
    model = tiny_lora(tiny_cfg).eval()
    rows = {
        0: [_answer_batch(65, 0, s) for s in (1, 2, 3, 4)],
        1: [_answer_batch(70, 1, s) for s in (5, 6, 7, 8)],
    }
    res = gradient_conflict(model, rows, ["a", "b"])
    assert sorted(res["per_layer"]) == [0, 1]
    for layer in (0, 1):
        params = [p for n, p in model.named_parameters() if p.requires_grad and f"layers.{layer}." in n]
        g0, g1 = _flat_grad(model, rows[0], params), _flat_grad(model, rows[1], params)
        assert res["per_layer"][layer]["mean_cosine"] == pytest.approx(_np_cos(g0, g1), abs=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    h1, h2 = _flat_grad(model, rows[1][:2], params), _flat_grad(model, rows[1][2:], params)
    assert res["noise_floor"]["per_task"]["b"] == pytest.approx(_np_cos(h1, h2), abs=1e-6)
    assert res["rows_per_task"] == {"a": 32, "b": 32}


def _toy_batch(task: int, seed: int, n: int = 4, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (n, length), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "task_ids": torch.full((n,), task),
    }


@pytest.mark.parametrize(
    "layer_cls,kw,task_specific",
    [
        (TaskMixLoraLinear, {"num_up": 2}, ["lora_lambda", "lora_task_logits"]),
        (MoeLoraLinear, {"num_experts": 2}, ["lora_task_embedding"]),
    ],
)
def test_task_specific_parameters_are_left_out_of_the_cosines(layer_cls, kw, task_specific) -> None:
    """Two tasks with the same rows and equal task-specific values: the shared parameters get the same
    gradient (cosine 1), while each task's own Λ_t / embedding row gets a gradient from that task only,
    orthogonal to the other's. Included, they pull the cosine to S / (S + P) (S, P: squared norms of the
    shared and the task-specific gradient)."""
    model = ToyLM(layer_cls, rank=2, alpha=4, num_tasks=2, **kw).eval()
    layer = model.layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        for name in task_specific:
            t = getattr(layer, name)
            t.copy_(t[0].expand_as(t))  # task 1's row = task 0's
    rows = {0: [_toy_batch(0, 1), _toy_batch(0, 2)], 1: [_toy_batch(1, 1), _toy_batch(1, 2)]}
    res = gradient_conflict(model, rows)
    assert res["excluded_params"] == sorted(task_specific)
    assert res["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    shared = [p for n, p in layer.named_parameters() if p.requires_grad and n not in task_specific]
    own = [getattr(layer, n) for n in task_specific]
    s_sq = float(np.sum(_flat_grad(model, rows[0], shared) ** 2))
    p_sq = float(np.sum(_flat_grad(model, rows[0], own) ** 2))
    assert p_sq > 0
    res_all = gradient_conflict(model, rows, exclude_task_specific=False)
    assert res_all["excluded_params"] == []
    assert res_all["mean_cosine"] == pytest.approx(s_sq / (s_sq + p_sq), rel=1e-6)
    assert res_all["mean_cosine"] < 1.0 - 1e-4


# ---------------------------------------------------------------- spectral


def _np_band(rank: int, band) -> list[int]:
    return [k for k in range(rank) if band[0] <= 100.0 * k / rank < band[1]]


def _np_alignment(heads: np.ndarray, band, svds=None) -> float:
    """methods.md §6 written out with loops (independent of the vectorised code)."""
    n = len(heads) if svds is None else len(svds)
    svds = svds or [np.linalg.svd(h.astype(np.float64), full_matrices=False) for h in heads]
    ks = _np_band(svds[0][1].size, band)
    total = 0.0
    for k in ks:
        for i in range(n):
            for j in range(n):
                if i != j:
                    ui, uj = svds[i][0][:, k], svds[j][0][:, k]
                    total += (
                        svds[i][1][k]
                        * svds[j][1][k]
                        * abs(ui @ uj)
                        / (np.linalg.norm(ui) * np.linalg.norm(uj))
                    )
    return total / (len(ks) * n * (n - 1))


def _np_importance(heads: np.ndarray, band) -> float:
    """The SV importance in %, as the paper and the notebook report it."""
    vals = []
    for h in heads:
        s = np.linalg.svd(h.astype(np.float64), compute_uv=False)
        vals.append(100 * s[_np_band(s.size, band)].sum() / s.sum())
    return float(np.mean(vals))


def _notebook_fig1b(layers: list[np.ndarray], bins: list[int]) -> tuple[list[float], list[float]]:
    """mtLoRA's fig1b notebook re-written: edges int(R·p/100), an empty band scores 0, per-band means over
    layers, conflict as % of the sum over bands, SV importance in %."""
    bands = list(zip(bins[:-1], bins[1:]))
    conflict, svi = {b: [] for b in bands}, {b: [] for b in bands}
    for heads in layers:
        svds = [np.linalg.svd(h.astype(np.float64), full_matrices=False) for h in heads]
        n, rank = len(svds), svds[0][1].shape[0]
        for band in bands:
            lo, hi = int(rank * band[0] / 100), int(rank * band[1] / 100)
            if lo >= hi:
                conflict[band].append(0.0)
                svi[band].append(0.0)
                continue
            tot = 0.0
            for k in range(lo, hi):
                for i in range(n):
                    for j in range(n):
                        if i != j:
                            ui, uj = svds[i][0][:, k], svds[j][0][:, k]
                            cos = abs(ui @ uj) / (np.linalg.norm(ui) * np.linalg.norm(uj))
                            tot += svds[i][1][k] * svds[j][1][k] * cos
            conflict[band].append(tot / ((hi - lo) * n * (n - 1)))
            svi[band].append(np.mean([s[lo:hi].sum() / max(s.sum(), 1e-10) * 100 for _, s, _ in svds]))
    mean_c = {b: np.mean(v) for b, v in conflict.items()}
    total = sum(mean_c.values())
    return [mean_c[b] / total * 100 for b in bands], [float(np.mean(svi[b])) for b in bands]


def test_band_indices_partition_the_rank() -> None:
    bands = [[0, 10], [10, 50], [50, 100]]
    got = [band_indices(20, b).tolist() for b in bands]
    assert got == [[0, 1], list(range(2, 10)), list(range(10, 20))]
    for edges in ("ceil", "floor"):
        for rank in (4, 7, 8, 16):
            assert sorted(sum((band_indices(rank, b, edges).tolist() for b in bands), [])) == list(
                range(rank)
            )


@pytest.mark.parametrize("rank", [16, 8, 4])
@pytest.mark.parametrize("bins", [[0, 10, 50, 100], [0, 20, 50, 100]])
def test_floor_band_edges_equal_the_notebooks(rank: int, bins: list[int]) -> None:
    for p0, p1 in zip(bins[:-1], bins[1:]):
        expected = list(range(int(rank * p0 / 100), int(rank * p1 / 100)))
        assert band_indices(rank, [p0, p1], "floor").tolist() == expected


def test_top_ten_percent_band_by_hand() -> None:
    """The notebook's floor edges: one SV in the top 10 % at R = 16, none at R = 8 or 4; ceil edges: two,
    one and one."""
    top = [0, 10]
    assert [band_indices(r, top, "floor").tolist() for r in (16, 8, 4)] == [[0], [], []]
    assert [band_indices(r, top, "ceil").tolist() for r in (16, 8, 4)] == [[0, 1], [0], [0]]
    assert band_indices(16, [0, 20], "floor").tolist() == [0, 1, 2]


@pytest.mark.parametrize("band", [[0, 10], [10, 50], [50, 100], [0, 20], [20, 50]])
def test_band_alignment_and_sv_importance_match_numpy(band) -> None:
    heads = np.random.default_rng(0).normal(size=(4, 16, 10))
    sv, u = head_svd(torch.tensor(heads))
    assert band_alignment(sv, u, band) == pytest.approx(_np_alignment(heads, band), rel=1e-9)
    assert sv_importance(sv, band) == pytest.approx(_np_importance(heads, band), rel=1e-9)


def test_sv_importance_is_in_percent_and_sums_to_100_over_a_partition() -> None:
    sv = np.array([[4.0, 3.0, 2.0, 1.0]])
    assert sv_importance(sv, [0, 50]) == pytest.approx(70.0)
    assert sv_importance(sv, [0, 25]) + sv_importance(sv, [25, 100]) == pytest.approx(100.0)


def test_identical_heads_are_fully_aligned_in_every_band() -> None:
    h = np.random.default_rng(1).normal(size=(8, 4))
    heads = np.stack([h, h, h])
    sv, u = head_svd(torch.tensor(heads))
    s = np.linalg.svd(h, compute_uv=False)
    # |cos(u_k, u_k)| = 1, so C = mean over the band of σ_k²
    assert band_alignment(sv, u, [0, 50]) == pytest.approx(np.mean(s[:2] ** 2))


def test_spectral_stats_of_a_model() -> None:
    model = hydra_toy(num_heads=3, rank=4)
    with torch.no_grad():
        model.layer.lora_B.copy_(torch.randn_like(model.layer.lora_B))
    heads = model.layer.lora_B.detach().numpy()
    bands = [[0, 25], [25, 50], [50, 100]]
    res = spectral_stats(model, bands)
    expected = [_np_alignment(heads, b) for b in bands]
    assert res["quantity"] == "B_i" and res["edges"] == "ceil" and res["band_sizes"] == {4: [1, 1, 2]}
    assert res["alignment"] == pytest.approx(expected, rel=1e-9)
    assert res["alignment_pct"] == pytest.approx([100 * e / sum(expected) for e in expected], rel=1e-9)
    assert res["sv_importance_pct"] == pytest.approx([_np_importance(heads, b) for b in bands], rel=1e-9)
    spec = res["spectra"]["layers.0.mlp.up_proj"]
    assert np.allclose(
        spec["A"], np.linalg.svd(model.layer.lora_A.detach().double().numpy(), compute_uv=False)
    )
    assert np.asarray(spec["B"]).shape == (3, 4)
    # plain LoRA: spectra only, no band statistics
    lora = spectral_stats(ToyLM(LoraLinear, rank=2, alpha=4), bands)
    assert lora["multi_head_layers"] == 0 and lora["alignment"] == [None, None, None]
    assert "B" in lora["spectra"]["layers.0.mlp.up_proj"]


@pytest.mark.parametrize("bins", [[0, 10, 50, 100], [0, 20, 50, 100]])
def test_floor_edges_reproduce_the_notebooks_numbers(bins) -> None:
    """R = 8: the notebook's top-10 % band is empty (it prints 0, we None); every other number matches."""
    model = hydra_toy(num_heads=4, rank=8)
    with torch.no_grad():
        model.layer.lora_B.copy_(torch.randn_like(model.layer.lora_B))
    heads = model.layer.lora_B.detach().double().numpy()
    pct, svi = _notebook_fig1b([heads], bins)
    res = spectral_stats(model, list(zip(bins[:-1], bins[1:])), edges="floor")
    assert [0.0 if v is None else v for v in res["alignment_pct"]] == pytest.approx(pct, rel=1e-9)
    assert [0.0 if v is None else v for v in res["sv_importance_pct"]] == pytest.approx(svi, rel=1e-9)
    assert (res["alignment_pct"][0] is None) == (bins[1] == 10)


def test_spectral_bands_of_own_a_heads_decompose_their_updates() -> None:
    """MoLoRA: the band statistics of ΔW_i = B_i A_i (its r nonzero singular values and left vectors)."""
    model = ToyLM(MoLoraLinear, rank=4, alpha=4, num_experts=3)
    with torch.no_grad():
        model.layer.lora_B.copy_(torch.randn_like(model.layer.lora_B))
    bb = model.layer.lora_B.detach().double().numpy()
    aa = model.layer.lora_A.detach().double().numpy().reshape(3, 4, 6)
    svds = []
    for i in range(3):
        u, s, vt = np.linalg.svd(bb[i] @ aa[i], full_matrices=False)
        svds.append((u[:, :4], s[:4], vt[:4]))
    res = spectral_stats(model, [[0, 50], [50, 100]])
    assert res["quantity"] == "B_i A_i"
    for i, band in enumerate([[0, 50], [50, 100]]):
        assert res["alignment"][i] == pytest.approx(_np_alignment(None, band, svds), rel=1e-7)
        expected_imp = np.mean([100 * s[_np_band(4, band)].sum() / s.sum() for _, s, _ in svds])
        assert res["sv_importance_pct"][i] == pytest.approx(expected_imp, rel=1e-7)


# ---------------------------------------------------------------- routing


def _groups(pi: torch.Tensor) -> torch.Tensor:
    """``(B, S, N)`` or ``(B, S, G, N)`` as ``(B, S, G, N)``."""
    return pi.unsqueeze(-2) if pi.ndim == 3 else pi


def routing_entropy(pi: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean token entropy over the unmasked tokens and the groups, from the module's ``token_entropy``."""
    return float(token_entropy(_groups(pi)).mean(-1)[mask.bool()].mean())


def usage_cv2(pi: torch.Tensor, mask: torch.Tensor) -> float:
    """The module's ``cv_squared`` of the mean routing weight per expert over unmasked tokens and groups."""
    pi = _groups(pi)
    return cv_squared(pi[mask.bool()].double().reshape(-1, pi.shape[-1]).mean(0))


def test_routing_entropy_and_cv2_by_hand() -> None:
    pi = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.9, 0.1], [0.2, 0.8]]])  # (B=2, S=2, N=2)
    mask = torch.tensor([[1, 1], [1, 0]])
    h = [math.log(2), 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    assert routing_entropy(pi, mask) == pytest.approx(np.mean(h), abs=1e-8)
    p_bar = np.array([(0.5 + 1.0 + 0.9) / 3, (0.5 + 0.0 + 0.1) / 3])
    assert usage_cv2(pi, mask) == pytest.approx(np.var(p_bar, ddof=1) / (p_bar.mean() ** 2 + 1e-10))
    # grouped routing (B, S, G, N): mean over tokens and groups
    grouped = torch.stack([pi, pi.flip(-1)], dim=2)
    assert routing_entropy(grouped, mask) == pytest.approx(np.mean(h), abs=1e-8)
    assert usage_cv2(grouped, mask) == pytest.approx(0.0, abs=1e-12)  # the flipped group balances usage


def test_routing_stats_of_a_fixed_router_match_numpy() -> None:
    model = hydra_toy(num_heads=3).eval()
    layer = model.layer
    w_r = layer.lora_router.detach().double().numpy()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    tasks = torch.tensor([0, 1, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "task_ids": tasks}
    res = routing_stats(model, {0: [batch]}, ["a", "b"])

    # the router runs in fp32: agreement to ~1e-7
    x = model.emb.weight.detach().double().numpy()[ids.numpy()]  # (3, 4, d)
    logits = x @ w_r.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = mask.numpy().astype(bool)
    tok = p[m]
    ent = np.mean(-(tok * np.log(tok + 1e-10)).sum(-1))
    p_bar = tok.mean(0)
    lay = res["layers"]["layers.0.mlp.up_proj"]
    assert lay["entropy"] == pytest.approx(ent, rel=1e-6) and res["entropy"] == pytest.approx(ent, rel=1e-6)
    assert lay["cv2"] == pytest.approx(np.var(p_bar, ddof=1) / (p_bar.mean() ** 2 + 1e-10), rel=1e-6)
    assert lay["usage"] == pytest.approx(p_bar.tolist(), rel=1e-6)
    assert lay["per_task"]["a"] == [pytest.approx(p[0][m[0]].mean(0).tolist(), rel=1e-6)]
    assert lay["per_task"]["b"] == [pytest.approx(p[1:][m[1:]].mean(0).tolist(), rel=1e-6)]
    assert lay["tokens"] == int(m.sum())
    assert routing_stats(ToyLM(LoraLinear, rank=2, alpha=4), {0: [batch]}) is None


def _np_router_weights(model, ids: torch.Tensor) -> np.ndarray:
    x = model.emb.weight.detach().double().numpy()[ids.numpy()]
    logits = x @ model.layer.lora_router.detach().double().numpy().T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p + 1e-10)).sum(-1)


def test_notebook_entropy_averages_every_padded_position_per_batch() -> None:
    """mtLoRA's fig1a: mean entropy over all positions of each batch (padding included), then over batches;
    ours: over the non-padding tokens of all batches pooled."""
    model = hydra_toy(num_heads=3).eval()
    b1 = {
        "input_ids": torch.tensor([[0, 1, 2], [3, 4, 5]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
    }
    b2 = {"input_ids": torch.tensor([[0, 0, 6, 7, 8]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    for b in (b1, b2):
        b["task_ids"] = torch.zeros(len(b["input_ids"]), dtype=torch.long)
    p1, p2 = _np_router_weights(model, b1["input_ids"]), _np_router_weights(model, b2["input_ids"])
    notebook = np.mean([_np_entropy(p1).mean(), _np_entropy(p2).mean()])
    masked = np.concatenate(
        [
            _np_entropy(p1)[b1["attention_mask"].numpy() == 1],
            _np_entropy(p2)[b2["attention_mask"].numpy() == 1],
        ]
    ).mean()
    assert not np.isclose(notebook, masked)
    nb = routing_stats(model, [b1, b2], protocol="notebook")
    assert nb["protocol"] == "notebook" and nb["entropy"] == pytest.approx(notebook, rel=1e-6)
    assert nb["entropy_masked"] == pytest.approx(masked, rel=1e-6)
    tok = routing_stats(model, [b1, b2])
    assert tok["entropy"] == pytest.approx(masked, rel=1e-6)
    assert tok["entropy_all_positions"] == pytest.approx(notebook, rel=1e-6)


def test_cv2_per_batch_differs_from_the_pooled_cv2() -> None:
    """Batch 1 routes to expert 0, batch 2 to expert 1: each batch is unbalanced (large CV²) while the pooled
    usage is balanced between the two."""
    model = hydra_toy(num_heads=2).eval()
    with torch.no_grad():
        model.emb.weight.zero_()
        model.emb.weight[1, 0] = 8.0
        model.emb.weight[2, 1] = 8.0
        model.layer.lora_router.copy_(torch.eye(2, 6))
    b1 = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    b2 = {"input_ids": torch.full((2, 3), 2), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    for b in (b1, b2):
        b["task_ids"] = torch.zeros(2, dtype=torch.long)

    def cv2(p_bar):
        return np.var(p_bar, ddof=1) / (p_bar.mean() ** 2 + 1e-10)

    p1, p2 = _np_router_weights(model, b1["input_ids"]), _np_router_weights(model, b2["input_ids"])
    per_batch = np.mean([cv2(p1.reshape(-1, 2).mean(0)), cv2(p2.reshape(-1, 2).mean(0))])
    pooled = cv2(np.concatenate([p1.reshape(-1, 2), p2.reshape(-1, 2)]).mean(0))
    res = routing_stats(model, [b1, b2])
    assert res["cv2_per_batch"] == pytest.approx(per_batch, rel=1e-6) and per_batch > 1.5
    assert res["cv2"] == pytest.approx(pooled, abs=1e-9) and pooled < 1e-6


def test_prompt_batches_are_left_padded_prompts_of_the_pooled_rows(tiny_cfg) -> None:
    tok = build_tokenizer(tiny_cfg.model)
    data = build_data(tiny_cfg.data, tok, int(tiny_cfg.model.max_seq_len))
    batches = pooled_prompt_batches(data, 10, 4, seed=0)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert set(torch.cat([b["task_ids"] for b in batches]).tolist()) <= {0, 1}
    for b in batches:
        assert "labels" not in b
        for m in b["attention_mask"]:
            n = int(m.sum())
            assert m[-n:].all() and not m[: len(m) - n].any()  # left padding
    assert pooled_prompt_batches(data, 10, 4, seed=0)[0]["input_ids"].equal(batches[0]["input_ids"])
    ex = data.train[0][0]
    one = collate_prompts([ex], [0], data.pad_id, side="right")
    assert one["input_ids"][0].tolist() == list(ex["input_ids"][: ex["prompt_len"]])
    mixed = mixed_batches(data, "train", 6, 4, seed=0)
    ids = torch.cat([b["task_ids"] for b in mixed])
    assert (
        sorted(ids.tolist()) == [0] * 6 + [1] * 6 and len({tuple(b["task_ids"].tolist()) for b in mixed}) > 1
    )


# ---------------------------------------------------------------- divergence


def test_divergence_uses_the_alignment_estimators() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.randn(12, 4, generator=g) + 1.0
    reps = {0: {"l": x}, 1: {"l": y}}
    res = representation_divergence(reps, ["a", "b"])
    assert res["kl"] == pytest.approx(float(gaussian_kl(x, y)), rel=1e-6)
    assert res["mmd"] == pytest.approx(float(mmd(x, y)), rel=1e-6)
    assert res["kl_matrix"][0, 1] == res["kl_matrix"][1, 0] == pytest.approx(res["kl"])
    assert representation_divergence({0: {"l": x}}) is None


def test_kl_grows_with_the_dimension_and_kl_per_dim_does_not() -> None:
    """Duplicating every dimension of the representations doubles the diagonal-Gaussian KL (a sum over
    dimensions) and leaves the per-dimension KL unchanged."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g) * 2 + 0.5
    small = representation_divergence({0: {"l": x}, 1: {"l": y}})
    big = representation_divergence({0: {"l": torch.cat([x, x], 1)}, 1: {"l": torch.cat([y, y], 1)}})
    assert big["kl"] == pytest.approx(2 * small["kl"], rel=1e-5)
    assert big["kl_per_dim"] == pytest.approx(small["kl_per_dim"], rel=1e-5)
    assert small["kl_per_dim"] == pytest.approx(small["kl"] / 4, rel=1e-6)
    assert small["dims"] == {"l": 4} and "kl_per_dim" in small["note"]


def test_divergence_between_two_synthetic_tasks_exceeds_that_within_one(tiny_cfg) -> None:
    tok = build_tokenizer(tiny_cfg.model)
    data = build_data(tiny_cfg.data, tok, int(tiny_cfg.model.max_seq_len))
    model = tiny_lora(tiny_cfg).eval()

    def rows(t, lo, hi):
        from mtlora.data.collate import collate

        return [collate([data.eval[t][i] for i in range(lo, hi)], [t] * (hi - lo), data.pad_id)]

    reps = collect_representations(model, {0: rows(0, 0, 48), 1: rows(1, 0, 48)})
    assert set(reps[0]) == set(reps[1]) and len(reps[0]) == 14
    assert all(z.shape == (48, tiny_cfg.adapter.rank) for z in reps[0].values())
    assert model.adapter_context.captured == {} and not model.adapter_context.capture
    between = representation_divergence(reps)
    halves = representation_divergence(
        {0: {n: z[:24] for n, z in reps[0].items()}, 1: {n: z[24:] for n, z in reps[0].items()}}
    )
    assert between["kl"] > 3 * halves["kl"] and between["mmd"] > 3 * halves["mmd"]


# ---------------------------------------------------------------- t-SNE


def test_parameter_tsne_groups_by_module_type_never_by_shape(monkeypatch) -> None:
    """R-LoRA's analysis_tsne.py embeds the B heads of each module type separately: gate_proj and up_proj
    have equal shapes but are never mixed into one t-SNE. (The tiny model's groups hold fewer points than a
    real t-SNE needs, so the minimum is lowered here: the grouping is what is tested.)"""
    import mtlora.diagnostics.tsne as tsne_module

    monkeypatch.setattr(tsne_module, "MIN_POINTS", 4)
    cfg = compose_train(["adapter=hydralora", "data.select=[arithmetic,word_sorting]"])
    model = tiny_lora(cfg)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, HydraLoraLinear):
                layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, HydraLoraLinear)}
    gate = next(m for n, m in layers.items() if n.endswith("gate_proj"))
    up = next(m for n, m in layers.items() if n.endswith("up_proj"))
    assert gate.lora_B.shape == up.lora_B.shape  # the case a grouping by shape would mix
    groups = parameter_points(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    assert {k for k in groups if k.startswith("B ")} == {f"B {k}" for k in kinds}
    assert all(k.split(" ", 1)[1] in kinds for k in groups)  # A groups too: by module type
    heads = cfg.adapter.num_heads
    for k in kinds:
        g = groups[f"B {k}"]
        n_layers = sum(n.endswith(k) for n in layers)
        assert len(g["points"]) == n_layers * heads
        assert g["labels"] == [f"B head {i}" for _ in range(n_layers) for i in range(heads)]
        first = layers[next(n for n in layers if n.endswith(k))]
        assert np.array_equal(g["points"][0], first.lora_B[0].detach().reshape(-1).numpy())


# ---------------------------------------------------------------- config and runner


@pytest.mark.parametrize("option", ["none", "default", "full", "mtlora_fig1"])
def test_every_diagnostics_option_composes_and_validates(option: str) -> None:
    cfg = compose_train([f"diagnostics={option}"])
    validate_config(cfg)
    assert cfg.diagnostics.name == option and check_diagnostics_config(cfg.diagnostics) == []
    assert set(cfg.diagnostics.which) <= set(DIAGNOSTICS)
    assert (option == "none") == (not cfg.diagnostics.which)


def test_config_errors_name_the_key() -> None:
    ok = OmegaConf.create(
        {
            "which": ["heads", "conflict"],
            "every_steps": 10,
            "spectral": {"bands": [[0, 10]], "edges": "floor"},
            "routing": {"protocol": "notebook", "max_examples": 500},
            "conflict": {"exclude_task_specific": False},
        }
    )
    assert check_diagnostics_config(ok) == []
    bad = OmegaConf.create(
        {
            "which": ["heads", "cka"],
            "plot_at": ["always"],
            "every_steps": 0,
            "conflict": {"batches_per_task": 0, "exclude_task_specific": "yes"},
            "spectral": {"bands": [[50, 10]], "edges": "round"},
            "routing": {"protocol": "rows", "max_examples": 0},
        }
    )
    errs = "\n".join(check_diagnostics_config(bad))
    for key in (
        "diagnostics.which",
        "diagnostics.every_steps=0",
        "conflict.batches_per_task=0",
        "spectral.bands",
        "diagnostics.plot_at",
        "diagnostics.spectral.edges='round'",
        "diagnostics.routing.protocol='rows'",
        "diagnostics.routing.max_examples=0",
        "diagnostics.conflict.exclude_task_specific='yes'",
    ):
        assert key in errs


def test_the_fig1_preset_runs_the_notebooks_protocols() -> None:
    cfg = compose_train(["experiment=mtlora/ablation/hydralora_qv_bbh"])
    d = cfg.diagnostics
    assert d.name == "mtlora_fig1" and list(d.which) == ["spectral", "routing"] and d.at_end and not d.at_init
    assert d.spectral.edges == "floor" and [list(b) for b in d.spectral.bands] == [
        [0, 20],
        [20, 50],
        [50, 100],
    ]
    assert d.routing.protocol == "notebook" and d.routing.max_examples == 500 and d.routing.batch_size == 4
    default = compose_train([]).diagnostics  # the default keeps ceil edges and the token protocol as knobs
    assert (
        compose_train(["diagnostics=default"]).diagnostics.spectral.edges == "ceil" and default.name == "none"
    )


def test_conflict_comparison_is_layer_by_layer_against_the_first_run() -> None:
    def rec(mean, layers, floor=0.5, above=True):
        return {
            "mean_cosine": mean,
            "conflict_ratio": 0.0,
            "noise_floor": {"mean": floor, "above_cross": above},
            "per_layer": {k: {"mean_cosine": v, "noise_floor": floor} for k, v in layers.items()},
        }

    comp = rec(0.4, {"0": 0.5, "1": 0.3, "10": 0.4})  # as read back from JSON: string keys
    block = rec(0.1, {0: 0.2, 1: 0.0, 2: 0.1})
    res = compare_conflict({"component": comp, "block": block})
    assert res["reference"] == "component" and res["layers"] == ["0", "1", "2", "10"]
    assert res["runs"]["block"]["cosine_drop_pct"] == pytest.approx(75.0)
    assert res["per_layer"]["block"]["0"]["delta"] == pytest.approx(-0.3)
    assert res["per_layer"]["block"]["10"] == {"mean_cosine": None, "delta": None, "noise_floor": None}
    assert res["per_layer"]["component"]["2"]["mean_cosine"] is None
    neg = compare_conflict({"a": rec(-0.2, {0: -0.2}), "b": rec(-0.1, {0: -0.1})})
    assert neg["runs"]["b"]["cosine_drop_pct"] is None


def test_runner_skips_what_does_not_apply_with_one_info_line(tmp_path, caplog) -> None:
    model = ToyLM(LoraLinear, rank=2, alpha=4)
    cfg = OmegaConf.create({"which": ["heads", "routing", "spectral"], "plots": False})
    data = SimpleNamespace(task_names=["a"], train=[], eval=[], pad_id=0)
    runner = DiagnosticsRunner(cfg, model, data, tmp_path, seed=0, method="lora")
    model.train()
    with caplog.at_level(logging.INFO, logger="mtlora.diagnostics.runner"):
        recs = runner.run(0, "init")
        runner.run(1, "step")
    assert [r["diagnostic"] for r in recs] == ["spectral"]
    assert model.training  # train mode restored
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == 2 and any("heads skipped for adapter.method=lora" in s for s in skips)
    lines = (tmp_path / "metrics" / "diagnostics.jsonl").read_text().splitlines()
    assert len(lines) == 2


@pytest.mark.parametrize(
    "hardware",
    ["gpu8_zero3", "gpu8_zero3_offload", "gpu1_zero3", "multinode hardware.deepspeed.stage=3"],
)
def test_diagnostics_under_zero3_are_refused_at_validation(hardware: str, monkeypatch) -> None:
    """ZeRO-3 partitions the parameters the main-process diagnostics read: a config error naming the fix."""
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    over = [f"hardware={hardware.split()[0]}", *hardware.split()[1:]]
    cfg = compose_train(over)
    validate_config(cfg)  # diagnostics=none (default): fine
    for option in ("default", "full"):
        with pytest.raises(ConfigError, match=r"diagnostics=.*not supported under DeepSpeed ZeRO-3") as e:
            validate_config(compose_train([*over, f"diagnostics={option}"]))
        assert "diagnostics=none" in str(e.value) and "python -m mtlora.diagnose" in str(e.value)
    # diagnostics=none with one diagnostic listed (the values `diagnostics.which=[heads]` would give)
    with open_dict(cfg):
        cfg.diagnostics.which = ["heads"]
    validate_config(cfg)  # none's schedule: never runs
    with open_dict(cfg):
        cfg.diagnostics.at_end = True
    with pytest.raises(ConfigError, match="ZeRO-3"):  # one diagnostic switched on is enough
        validate_config(cfg)


@pytest.mark.parametrize("hardware", ["gpu8_zero2", "gpu8_ddp", "cpu_ddp2", "multinode"])
def test_diagnostics_without_zero3_validate(hardware: str, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    cfg = compose_train([f"hardware={hardware}", "diagnostics=default"])
    validate_config(cfg)
    assert check_diagnostics_hardware(cfg) == []
