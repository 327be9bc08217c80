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
from mtlora.adapters.multihead import HydraLoraLinear
from mtlora.config import validate_config
from mtlora.data import build_data
from mtlora.diagnostics import DIAGNOSTICS, DiagnosticsRunner, check_diagnostics_config
from mtlora.diagnostics.config import check_diagnostics_hardware
from mtlora.diagnostics.conflict import conflict_stats, gradient_conflict, lm_loss
from mtlora.diagnostics.divergence import collect_representations, representation_divergence
from mtlora.diagnostics.heads import head_cosine_matrix, head_similarity, mean_offdiagonal
from mtlora.diagnostics.routing import routing_entropy, routing_stats, usage_cv2
from mtlora.diagnostics.spectral import band_alignment, band_indices, head_svd, spectral_stats, sv_importance
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
    assert res["layers"]["layers.0.mlp.up_proj"] == pytest.approx(expected, abs=1e-9)
    assert res["by_module"]["up_proj"] == {"layer": [0], "similarity": [pytest.approx(expected, abs=1e-9)]}
    with torch.no_grad():
        layer.lora_B.copy_(layer.lora_B[0].expand_as(layer.lora_B))
    assert head_similarity(model)["mean"] == pytest.approx(1.0)
    with torch.no_grad():
        layer.lora_B.zero_()  # HydraLoRA's init: no cosine is defined
    assert head_similarity(model)["mean"] is None


def test_head_similarity_does_not_apply_to_plain_lora() -> None:
    assert head_similarity(ToyLM(LoraLinear, rank=2, alpha=4)) is None


# ---------------------------------------------------------------- gradient conflict


def test_conflict_stats_on_a_hand_made_matrix() -> None:
    m = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, -0.4], [-0.2, -0.4, 1.0]])
    s = conflict_stats(m)
    assert s["pairs"] == 3
    assert s["mean"] == pytest.approx((0.5 - 0.2 - 0.4) / 3)
    assert s["std"] == pytest.approx(np.std([0.5, -0.2, -0.4]))
    assert s["conflict_ratio"] == pytest.approx(2 / 3)


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


def test_two_copies_of_one_task_agree_and_contradicting_targets_conflict(tiny_cfg) -> None:
    model = tiny_lora(tiny_cfg).eval()
    a, b = 65, 66  # same prompts; the answers "A" and "B"
    copies = {
        0: [_answer_batch(a, 0, 1), _answer_batch(a, 0, 2)],
        1: [_answer_batch(a, 1, 1), _answer_batch(a, 1, 2)],
    }
    res = gradient_conflict(model, copies, ["t", "t_copy"])
    assert res["mean"] == pytest.approx(1.0, abs=1e-6) and res["conflict_ratio"] == 0.0
    assert all(v["mean"] == pytest.approx(1.0, abs=1e-5) for v in res["per_layer"].values())
    assert len(res["per_layer"]) == 14  # 7 target modules x 2 layers
    other_rows = gradient_conflict(model, {0: [_answer_batch(a, 0, 1)], 1: [_answer_batch(a, 1, 3)]})
    assert 0.0 < other_rows["mean"] < 1.0 - 1e-6  # same task, other prompts: agree, not identical

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
    res = gradient_conflict(model, {0: [_answer_batch(a, 0, 1)], 1: [_answer_batch(b, 1, 1)]})
    assert res["mean"] < -0.5 and res["conflict_ratio"] == 1.0
    assert np.allclose(np.diag(res["matrix"]), 1.0)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched


# ---------------------------------------------------------------- spectral


def _np_band(rank: int, band) -> list[int]:
    return [k for k in range(rank) if band[0] <= 100.0 * k / rank < band[1]]


def _np_alignment(heads: np.ndarray, band) -> float:
    """methods.md §6 written out with loops (independent of the vectorised code)."""
    n = len(heads)
    svds = [np.linalg.svd(h.astype(np.float64), full_matrices=False) for h in heads]
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
    vals = []
    for h in heads:
        s = np.linalg.svd(h.astype(np.float64), compute_uv=False)
        vals.append(s[_np_band(s.size, band)].sum() / s.sum())
    return float(np.mean(vals))


def test_band_indices_partition_the_rank() -> None:
    bands = [[0, 10], [10, 50], [50, 100]]
    got = [band_indices(20, b).tolist() for b in bands]
    assert got == [[0, 1], list(range(2, 10)), list(range(10, 20))]
    assert sorted(sum((band_indices(7, b).tolist() for b in bands), [])) == list(range(7))


@pytest.mark.parametrize("band", [[0, 10], [10, 50], [50, 100], [0, 20], [20, 50]])
def test_band_alignment_and_sv_importance_match_numpy(band) -> None:
    heads = np.random.default_rng(0).normal(size=(4, 16, 10))
    sv, u = head_svd(torch.tensor(heads))
    assert band_alignment(sv, u, band) == pytest.approx(_np_alignment(heads, band), rel=1e-9)
    assert sv_importance(sv, band) == pytest.approx(_np_importance(heads, band), rel=1e-9)


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
    assert res["alignment"] == pytest.approx(expected, rel=1e-9)
    assert res["alignment_pct"] == pytest.approx([100 * e / sum(expected) for e in expected], rel=1e-9)
    assert res["sv_importance"] == pytest.approx([_np_importance(heads, b) for b in bands], rel=1e-9)
    spec = res["spectra"]["layers.0.mlp.up_proj"]
    assert np.allclose(
        spec["A"], np.linalg.svd(model.layer.lora_A.detach().double().numpy(), compute_uv=False)
    )
    assert np.asarray(spec["B"]).shape == (3, 4)
    # plain LoRA: spectra only, no band statistics
    lora = spectral_stats(ToyLM(LoraLinear, rank=2, alpha=4), bands)
    assert lora["multi_head_layers"] == 0 and lora["alignment"] == [None, None, None]
    assert "B" in lora["spectra"]["layers.0.mlp.up_proj"]


# ---------------------------------------------------------------- routing


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


# ---------------------------------------------------------------- config and runner


@pytest.mark.parametrize("option", ["none", "default", "full"])
def test_every_diagnostics_option_composes_and_validates(option: str) -> None:
    cfg = compose_train([f"diagnostics={option}"])
    validate_config(cfg)
    assert cfg.diagnostics.name == option and check_diagnostics_config(cfg.diagnostics) == []
    assert set(cfg.diagnostics.which) <= set(DIAGNOSTICS)
    assert (option == "none") == (not cfg.diagnostics.which)


def test_config_errors_name_the_key() -> None:
    ok = OmegaConf.create(
        {"which": ["heads", "conflict"], "every_steps": 10, "spectral": {"bands": [[0, 10]]}}
    )
    assert check_diagnostics_config(ok) == []
    bad = OmegaConf.create(
        {
            "which": ["heads", "cka"],
            "plot_at": ["always"],
            "every_steps": 0,
            "conflict": {"batches_per_task": 0},
            "spectral": {"bands": [[50, 10]]},
        }
    )
    errs = "\n".join(check_diagnostics_config(bad))
    for key in (
        "diagnostics.which",
        "diagnostics.every_steps=0",
        "conflict.batches_per_task=0",
        "spectral.bands",
        "diagnostics.plot_at",
    ):
        assert key in errs


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
