"""Target matching (checked against peft's own matcher), injection into the tiny model, adapter state I/O,
and merge/unmerge over a whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file
from torch import nn

from mtlora.adapters import (
    AdapterLayer,
    LoraLinear,
    adapter_layers,
    adapter_state_dict,
    find_targets,
    inject_adapters,
    load_adapter,
    load_adapter_state_dict,
    matches_target,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from mtlora.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mtlora.errors import ConfigError
from mtlora.models import build_model
from mtlora.run.checksums import MANIFEST
from tests.helpers.compose import compose_train
from tests.helpers.tiny import logits, tokens

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.qq_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.11.mlp.down_proj",
    "model.layers.0.mlp_extra.up_proj",
    "model.layers.0.mlp.up_projection",
    "q_proj",
    "xq_proj",
    "lm_head",
    "model.embed_tokens",
]

TARGETS = [
    ["q_proj"],
    ["q_proj", "v_proj"],
    ["up_proj", "gate_proj", "down_proj"],
    ["mlp.up_proj"],
    ["self_attn.q_proj", "lm_head"],
    ["proj"],  # suffix match is on whole name parts: "proj" matches nothing here
    ["layers.0.mlp.up_proj"],
    r".*\.mlp\..*_proj",
    r".*_proj",
    r"q_proj",
    r".*\.(q|k)_proj",
    r"model\.layers\.1\d*\..*",
    r"mlp",  # fullmatch, not search
]


def peft_matches(name: str, target) -> bool:
    cfg = LoraConfig(target_modules=target, r=2)
    return bool(check_target_module_exists(cfg, name))


@pytest.mark.parametrize("target", TARGETS, ids=[str(t) for t in TARGETS])
def test_matches_target_agrees_with_peft(target) -> None:
    ours = {n for n in NAMES if matches_target(n, target)}
    theirs = {n for n in NAMES if peft_matches(n, target)}
    assert ours == theirs


@pytest.mark.parametrize(
    ("name", "target", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.qq_proj", ["q_proj"], False),
        ("xq_proj", ["q_proj"], False),
        ("q_proj", ["q_proj"], True),
        ("model.layers.0.mlp.up_projection", ["up_proj"], False),
        ("model.layers.0.mlp.up_proj", r".*\.mlp\..*_proj", True),
        ("model.layers.0.mlp_extra.up_proj", r".*\.mlp\..*_proj", False),
        ("model.layers.0.self_attn.q_proj", r".*\.mlp\..*_proj", False),
        ("model.layers.0.self_attn.q_proj", "q_proj", False),  # a string must match the full name
        ("model.layers.0.mlp.up_proj", "mlp", False),
        ("model.layers.0.mlp.up_proj", ["mlp.up_proj"], True),
    ],
)
def test_matches_target_table(name: str, target, expected: bool) -> None:
    assert matches_target(name, target) is expected
    assert peft_matches(name, target) is expected  # the table itself is peft's behaviour


def test_all_linear_excludes_lm_head() -> None:
    assert matches_target("model.layers.0.self_attn.q_proj", "all-linear")
    assert matches_target("model.layers.3.mlp.down_proj", "all-linear")
    assert not matches_target("lm_head", "all-linear")
    assert not matches_target("model.lm_head", "all-linear")


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def cfg():
    return compose_train(["debug=smoke"])


def fresh(cfg, **adapter_overrides):
    model = build_model(cfg.model)
    acfg = cfg.adapter.copy()
    for k, v in adapter_overrides.items():
        OmegaConf.update(acfg, k, v, merge=False)
    return model, acfg


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def randomise_b(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def test_inject_only_lora_trainable_and_counts(cfg) -> None:
    model, acfg = fresh(cfg)
    expected = [n for n in linear_names(model) if matches_target(n, list(acfg.target_modules))]
    # the default target list adapts all 7 projections of both layers, and not lm_head
    assert len(expected) == 7 * cfg.model.arch.num_hidden_layers
    assert "lm_head" not in expected
    ctx = inject_adapters(model, acfg)

    layers = adapter_layers(model)
    assert sorted(layers) == sorted(expected)
    assert all(isinstance(m, LoraLinear) for m in layers.values())
    assert all(m.context is ctx for m in layers.values())
    assert model.adapter_context is ctx
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in expected for ab in "AB"}
    # the embeddings / norms / head / base weights stay frozen
    assert not model.get_input_embeddings().weight.requires_grad
    assert all(not m.base_layer.weight.requires_grad for m in layers.values())


def test_find_targets_follows_target_modules(cfg) -> None:
    model, _ = fresh(cfg)
    linears = linear_names(model)
    assert find_targets(model, ["q_proj"]) == [n for n in linears if n.endswith(".q_proj")]
    assert len(find_targets(model, ["q_proj"])) == cfg.model.arch.num_hidden_layers
    mlp = find_targets(model, r".*\.mlp\..*_proj")
    assert mlp and all(".mlp." in n for n in mlp)
    assert len(mlp) == 3 * cfg.model.arch.num_hidden_layers
    every = find_targets(model, "all-linear")
    assert "lm_head" in linears and "lm_head" not in every
    assert len(every) == len(linears) - 1
    assert find_targets(model, OmegaConf.create(["q_proj"])) == find_targets(model, ["q_proj"])


def test_injected_model_starts_equal_to_base(cfg) -> None:
    model, acfg = fresh(cfg)
    ids = tokens()
    before = logits(model, ids)
    inject_adapters(model, acfg)
    assert len(adapter_layers(model)) > 0
    after = logits(model, ids)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # and it stops being equal once B moves
    randomise_b(model)
    assert (logits(model, ids) - before).abs().max() > 1e-3


def test_targets_matching_nothing_raise_config_error(cfg) -> None:
    model, acfg = fresh(cfg, target_modules=["query", "value"])
    with pytest.raises(ConfigError) as ei:
        inject_adapters(model, acfg)
    msg = str(ei.value)
    assert "adapter.target_modules" in msg
    assert "query" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg
    # nothing was changed on the failed call
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_regex_matching_nothing_raises(cfg) -> None:
    model, acfg = fresh(cfg, target_modules=r"q_proj")  # fullmatch on the full name: matches nothing
    with pytest.raises(ConfigError, match=r"adapter\.target_modules"):
        inject_adapters(model, acfg)


def test_unknown_method_lists_allowed(cfg) -> None:
    model, acfg = fresh(cfg, method="dora_typo")
    with pytest.raises(ConfigError) as ei:
        inject_adapters(model, acfg)
    assert "adapter.method" in str(ei.value)
    assert "dora_typo" in str(ei.value)
    assert "'lora'" in str(ei.value)


def test_save_load_adapter_round_trip(cfg, tmp_path: Path) -> None:
    ids = tokens()
    model, acfg = fresh(cfg)
    inject_adapters(model, acfg)
    randomise_b(model)
    with torch.no_grad():  # A too, so that the fresh model's own random init cannot coincide
        for layer in adapter_layers(model).values():
            layer.lora_A.mul_(1.5)
    want = logits(model, ids)
    out = save_adapter(model, tmp_path / "adapter", OmegaConf.to_container(acfg))
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG, MANIFEST])
    assert json.loads((out / ADAPTER_CONFIG).read_text())["rank"] == acfg.rank
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}

    other, acfg2 = fresh(cfg)
    inject_adapters(other, acfg2)
    assert (logits(other, ids) - want).abs().max() > 1e-3  # before loading: different
    load_adapter(other, out)
    got = adapter_state_dict(other)
    ref = adapter_state_dict(model)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    torch.testing.assert_close(logits(other, ids), want, atol=0, rtol=0)


def test_load_adapter_rejects_other_shapes_and_keys(cfg) -> None:
    model, acfg = fresh(cfg)
    inject_adapters(model, acfg)
    state = adapter_state_dict(model)
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="shape"):
        load_adapter_state_dict(model, bad)
    missing = dict(state)
    missing.pop(key)
    with pytest.raises(ConfigError, match="missing"):
        load_adapter_state_dict(model, missing)


def test_merge_and_unmerge_whole_model(cfg) -> None:
    ids = tokens()
    model, acfg = fresh(cfg)
    inject_adapters(model, acfg)
    randomise_b(model)
    layers = adapter_layers(model)
    base_w = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    unmerged = logits(model, ids)

    merge_adapters(model)
    assert all(m.merged for m in layers.values())
    assert any((m.base_layer.weight - base_w[n]).abs().max() > 1e-4 for n, m in layers.items())
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)

    unmerge_adapters(model)
    assert not any(m.merged for m in layers.values())
    for n, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight.detach(), base_w[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_refuses_unmergeable_adapters(cfg) -> None:
    class Routed(AdapterLayer):
        def delta(self, x):
            return torch.zeros(*x.shape[:-1], self.out_features)

    model, acfg = fresh(cfg)
    inject_adapters(model, acfg)
    name, layer = next(iter(adapter_layers(model).items()))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, Routed(layer.base_layer, name, layer.context))
    with pytest.raises(TypeError, match="Routed"):
        merge_adapters(model)
    assert not any(getattr(m, "merged", False) for m in adapter_layers(model).values())
