"""LoraHub composition (mtlora.procedures.lorahub): factor-wise sums, the objective, one-hot weights, library checks."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mtlora.adapters import AdapterContext, LoraLinear, adapter_state_dict, inject_adapters
from mtlora.adapters.state import load_adapter_state_dict
from mtlora.errors import ConfigError
from mtlora.models import build_model
from mtlora.procedures.lorahub import (
    Objective,
    check_library_run,
    compose_factors,
    load_library_weights,
    optimize,
    preflight_lorahub,
    resolve_library,
    sample_modules,
    set_composition,
)
from mtlora.run.rundir import save_resolved_config
from tests.helpers.compose import compose_train

HUB = ["adapter=lorahub"]


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.lin = layer


def test_composition_is_factor_wise_not_a_sum_of_products() -> None:
    g = torch.Generator().manual_seed(0)
    k, r, d_in, d_out = 3, 2, 5, 4
    a, b = torch.randn(k, r, d_in, generator=g), torch.randn(k, d_out, r, generator=g)
    w = torch.tensor([0.7, -1.2, 0.4])
    a_hat, b_hat = compose_factors(w, a, b)
    a_ref, b_ref = torch.zeros(r, d_in), torch.zeros(d_out, r)
    for i in range(k):  # computed independently, one module at a time
        a_ref += float(w[i]) * a[i]
        b_ref += float(w[i]) * b[i]
    torch.testing.assert_close(a_hat, a_ref)
    torch.testing.assert_close(b_hat, b_ref)

    # written into a LoRA layer: its update is s·B̂Â, which is far from s·Σ w_i B_i A_i
    layer = LoraLinear(nn.Linear(d_in, d_out), "lin", AdapterContext(), rank=r, alpha=4.0)
    set_composition(_Holder(layer), {"lin": (a, b)}, w.numpy())
    factor_wise = layer.scaling * b_ref @ a_ref
    sum_of_products = layer.scaling * sum(float(w[i]) * b[i] @ a[i] for i in range(k))
    torch.testing.assert_close(layer.delta_weight().detach(), factor_wise)
    assert (factor_wise - sum_of_products).abs().max() > 0.5  # an Σ w_i B_i A_i implementation would fail


class _FixedLogits(nn.Module):
    """A 'model' whose logits are given per batch (looked up by its first input id)."""

    def __init__(self, logits: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.logits = logits
        object.__setattr__(self, "adapter_context", AdapterContext())

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits[int(input_ids[0, 0])])


def test_objective_without_ce_norm_is_pooled_answer_token_ce_plus_l1_mean_abs_w() -> None:
    v = 4
    # batch 1: position 0 uniform (CE ln 4 on label 2), position 1 gives label 1 prob 3/6 (CE ln 2)
    l1 = torch.zeros(1, 3, v)
    l1[0, 1, 1] = math.log(3.0)
    b1 = {
        "input_ids": torch.tensor([[0, 5, 5]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[-100, 2, 1]]),
        "task_ids": torch.tensor([0]),
    }
    # batch 2: one answer token, uniform logits (CE ln 4); the prompt position is masked
    l2 = torch.zeros(1, 3, v)
    l2[0, 0] = 7.0  # would change the loss if the masked position counted
    b2 = {
        "input_ids": torch.tensor([[1, 5, 5]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 3]]),
        "task_ids": torch.tensor([0]),
    }
    obj = Objective(_FixedLogits({0: l1, 1: l2}), {}, [b1, b2], l1=0.05, ce_norm="none")
    w = [1.0, -0.5, 0.0]
    ce = (math.log(4) + math.log(2) + math.log(4)) / 3  # pooled over the 3 answer tokens, not per batch
    assert obj(w) == pytest.approx(ce + 0.05 * 0.5, rel=1e-6)
    assert obj.evaluate([0.0, 0.0, 0.0])[0] == pytest.approx(ce, rel=1e-6)
    assert obj.history[0]["ce"] == pytest.approx(ce, rel=1e-6) and len(obj.history) == 1


def _code_objective(example_token_losses: list[list[float]], weights: list[float], batch_size=None) -> float:
    """lorahub/algorithm.py's default_get_loss + default_l1_regularization, re-done on per-token losses: each
    batch's loss is the mean over its label tokens (a seq2seq model's outputs.loss), summed over batches and
    divided by the number of examples; plus 0.05 · Σ|w| / len(w). Default batch: all examples at once."""
    n = len(example_token_losses)
    bs = n if batch_size is None else min(n, batch_size)
    total = 0.0
    for s in range(0, n, bs):
        tokens = [x for ex in example_token_losses[s : s + bs] for x in ex]
        total += sum(tokens) / len(tokens)
    return total / n + 0.05 * sum(abs(w) for w in weights) / len(weights)


def _hand_built_fewshot(seed: int = 0):
    """Five rows in two batches (3 + 2) of a fixed-logit model; returns (batches, model, per-row token CEs).
    Row answer tokens get logit ``a`` on their label and 0 elsewhere (vocab 4): CE = ln(e^a + 3) − a."""
    g = torch.Generator().manual_seed(seed)
    v, length = 4, 5
    answers = [[2, 3], [1, 2, 3], [3], [2, 1, 0], [1]]  # answer tokens per row (label positions at the end)
    losses, batches, logits = [], [], {}
    for b, rows in enumerate(([0, 1, 2], [3, 4])):
        lg = torch.zeros(len(rows), length, v)
        labels = torch.full((len(rows), length), -100)
        for j, r in enumerate(rows):
            ce_row = []
            for k, tok in enumerate(answers[r]):
                pos = length - len(answers[r]) + k  # label position; logits at pos - 1 predict it
                a = float(torch.rand((), generator=g) * 4 - 1)
                labels[j, pos] = tok
                lg[j, pos - 1, tok] = a
                ce_row.append(math.log(math.exp(a) + v - 1) - a)
            losses.append(ce_row)
        lg[:, -1] = 9.0  # the last position predicts nothing: must not count
        ids = torch.full((len(rows), length), 5)
        ids[0, 0] = b
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": labels,
                "task_ids": torch.zeros(len(rows), dtype=torch.long),
            }
        )
        logits[b] = lg
    return batches, _FixedLogits(logits), losses


def test_objective_is_the_codes_ce_over_n_examples_plus_l1_mean_abs_w() -> None:
    batches, model, losses = _hand_built_fewshot()
    w = [0.9, -0.3, 0.0, 1.4]
    obj = Objective(model, {}, batches, l1=0.05)  # ce_norm defaults to the code's n_examples
    assert obj.n_examples == 5
    expected = _code_objective(losses, w)
    assert obj(w) == pytest.approx(expected, rel=1e-6)
    pooled = sum(sum(r) for r in losses) / sum(len(r) for r in losses)
    assert obj.history[-1]["ce"] == pytest.approx(pooled, rel=1e-6)
    # CE / 5: the L1 term pulls 5x harder than with ce_norm=none, whose value differs accordingly
    none = Objective(model, {}, batches, l1=0.05, ce_norm="none")
    assert none(w) == pytest.approx(pooled + 0.05 * sum(abs(x) for x in w) / len(w), rel=1e-6)
    assert abs(none(w) - obj(w)) > 0.5
    with pytest.raises(ConfigError, match="adapter.ce_norm"):
        Objective(model, {}, batches, l1=0.05, ce_norm="tokens")


def test_optimize_returns_nevergrads_recommendation_and_the_best_evaluated_point() -> None:
    ng = pytest.importorskip("nevergrad")
    batches, model, _ = _hand_built_fewshot()

    class Quadratic(Objective):  # a deterministic objective with an interior optimum (no model needed)
        def evaluate(self, w):
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            ce = float(((w - np.array([0.7, -0.4, 0.2])) ** 2).sum()) + 1.0
            return ce / self.ce_divisor + self.l1 * float(np.abs(w).mean()), ce

    obj = Quadratic(model, {}, batches, l1=0.05)
    res = optimize(obj, 3, budget=25, bound=1.5, optimizer="NGOpt", seed=3)
    # the released lorahub_learning: NGOpt over Array(init 0, ±1.5), optimizer.minimize(get_score)
    param = ng.p.Array(init=np.zeros(3), lower=-1.5, upper=1.5)
    param.random_state = np.random.RandomState(3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RHOEND.*")  # scipy's COBYLA, chosen by NGOpt
        rec = ng.optimizers.NGOpt(parametrization=param, budget=25).minimize(lambda w: obj.evaluate(w)[0])
    np.testing.assert_allclose(res["recommendation"]["weights"], rec.value)
    assert res["recommendation"]["loss"] == pytest.approx(obj.evaluate(rec.value)[0])
    assert len(obj.history) == 25  # the recommendation's evaluation is not one of the optimizer's
    best = min([*obj.history, {"loss": obj.evaluate(np.zeros(3))[0]}], key=lambda r: r["loss"])
    assert res["best_evaluated"]["loss"] == best["loss"]


def _fake_run(root: Path, name: str, overrides: list[str], state: dict | None = None, done=True) -> Path:
    """A run dir with the files a finished run has (config, markers, adapter weights, base_model)."""
    d = root / name
    cfg = compose_train(overrides, run_dir=d)
    d.mkdir(parents=True)
    save_resolved_config(cfg, d)
    (d / "adapter").mkdir()
    save_file(state or {"x": torch.zeros(1)}, str(d / "adapter" / "adapter_model.safetensors"))
    (d / "base_model" / "tokenizer").mkdir(parents=True)
    (d / "base_model" / "source.json").write_text("{}")
    if done:
        (d / "COMPLETED").write_text("done\n")
    return d


def _tiny_lora_model(cfg):
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    return model.eval()


def test_one_hot_weights_reproduce_that_modules_logits_exactly(tmp_path: Path) -> None:
    cfg = compose_train(HUB, run_dir=tmp_path)
    model = _tiny_lora_model(cfg)
    g = torch.Generator().manual_seed(1)
    states = [
        {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in adapter_state_dict(model).items()}
        for _ in range(3)
    ]
    dirs = [_fake_run(tmp_path, f"lib{i}", [], s) for i, s in enumerate(states)]
    stacks = load_library_weights(model, dirs)
    x = torch.randint(0, 200, (2, 11), generator=g)
    ref_model = _tiny_lora_model(cfg)  # each entry's weights loaded in turn (every adapter tensor replaced)
    with torch.no_grad():
        base = model(input_ids=x).logits  # fresh LoRA: B = 0
        for i in range(3):
            set_composition(model, stacks, [float(j == i) for j in range(3)])
            composed = model(input_ids=x).logits
            load_adapter_state_dict(ref_model, states[i])
            ref = ref_model(input_ids=x).logits
            assert torch.equal(composed, ref), i
            assert not torch.equal(composed, base)
        set_composition(model, stacks, [0.0, 0.0, 0.0])
        assert torch.equal(model(input_ids=x).logits, base)  # w = 0 is the base model

    bad = dict(states[0])
    bad.pop(next(iter(bad)))
    broken = _fake_run(tmp_path, "broken", [], bad)
    with pytest.raises(ConfigError, match="missing") as e:
        load_library_weights(model, [dirs[0], broken])
    assert str(broken) in str(e.value) and next(iter(states[0])) in str(e.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["adapter.rank=4"], "adapter.rank=4"),
        (["adapter.alpha=32"], "adapter.alpha=32"),
        (["adapter.target_modules=[q_proj,v_proj]"], "adapter.target_modules"),
        (["adapter=dora"], "adapter.method='dora'"),
        (["model.arch.hidden_size=64"], "model.arch.hidden_size=64"),
        (["model.init_seed=7"], "model.init_seed=7"),
    ],
)
def test_mismatching_library_run_is_an_error_naming_dir_and_key(tmp_path: Path, overrides, key) -> None:
    cfg = compose_train(HUB, run_dir=tmp_path / "hub")
    good = _fake_run(tmp_path, "good", ["train.optimizer.lr=0.1", "adapter.dropout=0.3"])
    check_library_run(cfg, good)  # training settings and dropout may differ
    bad = _fake_run(tmp_path, "bad", overrides)
    with pytest.raises(ConfigError) as e:
        check_library_run(cfg, bad)
    assert str(bad) in str(e.value) and key in str(e.value)


def test_unfinished_or_missing_library_runs_fail_in_preflight(tmp_path: Path) -> None:
    running = _fake_run(tmp_path, "running", [], done=False)
    cfg = compose_train([*HUB, f"adapter.library=['{running}']"], run_dir=tmp_path / "hub")
    with pytest.raises(ConfigError, match="not COMPLETED") as e:
        preflight_lorahub(cfg)
    assert str(running) in str(e.value)
    with pytest.raises(ConfigError, match="give the LoRA run dirs"):
        preflight_lorahub(compose_train(HUB, run_dir=tmp_path / "hub"))
    cfg = compose_train([*HUB, "adapter.library=[a]", "adapter.budget=0", "adapter.weight_bound=0"])
    with pytest.raises(ConfigError, match="adapter.budget=0") as e:
        preflight_lorahub(cfg)
    assert "adapter.weight_bound=0" in str(e.value)


def test_library_glob_and_module_sampling(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / "lib" / name).mkdir(parents=True)
    (tmp_path / "lib" / "multirun.yaml").write_text("")  # files are skipped
    cfg = compose_train(
        [*HUB, f"adapter.library=['{tmp_path}/lib/c']", f"adapter.library_glob={tmp_path}/lib/*"]
    )
    dirs = resolve_library(cfg.adapter)
    assert [d.name for d in dirs] == ["c", "a", "b"]  # list first, then sorted glob, duplicates dropped
    assert sample_modules(dirs, None, 0) == dirs
    picks = {tuple(sample_modules(dirs, 2, s)) for s in range(20)}
    assert all(len(p) == 2 and set(p) <= set(dirs) for p in picks) and len(picks) > 1
    assert sample_modules(dirs, 2, 5) == sample_modules(dirs, 2, 5)
    with pytest.raises(ConfigError, match="num_modules=4"):
        sample_modules(dirs, 4, 0)
