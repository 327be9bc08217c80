"""Byte tokenizer, the deterministic tiny model, and the meta-device presets (parameter counts)."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from mtlora.adapters import adapter_layers, inject_adapters
from mtlora.errors import ConfigError
from mtlora.models import build_model, build_tokenizer, count_parameters, meta_model
from mtlora.models.byte_tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer
from tests.helpers.compose import compose_train

# ---------------------------------------------------------------- byte tokenizer

TEXTS = [
    "hello world",
    "héllo wörld — naïve café",
    "line one\nline two\r\n\ttabbed\n\n",
    "  leading and  double  spaces , . ! ? don't ",
    "中文 日本語 한국어 العربية עברית",
    "emoji 😀👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\x00\x01 control \x7f",
    "",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(r.randint(0, 30)):
            lo, hi = r.choice(
                [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
            )
            chars.append(chr(r.randint(lo, hi)))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.mark.parametrize("text", TEXTS + random_texts(50), ids=lambda t: repr(t)[:20])
def test_byte_tokenizer_round_trips(tok, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one id per byte, no specials added
    assert all(3 <= i < BYTE_VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_tokens_and_size(tok) -> None:
    assert len(tok) == BYTE_VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "right"
    assert tok.decode([1, *tok("ab")["input_ids"], 2], skip_special_tokens=True) == "ab"
    # every id 0..258 is used exactly once, and every ASCII byte is its own single id
    assert sorted(tok.get_vocab().values()) == list(range(BYTE_VOCAB_SIZE))
    ascii_ids = [tok(chr(b))["input_ids"] for b in range(128)]
    assert all(len(i) == 1 for i in ascii_ids)
    assert len({i[0] for i in ascii_ids}) == 128


def test_byte_tokenizer_two_builds_identical(tok) -> None:
    other = build_byte_tokenizer()
    assert other.get_vocab() == tok.get_vocab()
    for text in TEXTS:
        assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_build_tokenizer_for_tiny_is_byte_level() -> None:
    cfg = compose_train(["debug=smoke"])
    t = build_tokenizer(cfg.model)
    assert t.get_vocab() == build_byte_tokenizer().get_vocab()


def test_build_tokenizer_unknown_kind() -> None:
    cfg = compose_train(["debug=smoke"])
    OmegaConf.update(cfg, "model.tokenizer.kind", "sentencepiece")
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.kind"):
        build_tokenizer(cfg.model)


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose_train(["debug=smoke"])


def test_tiny_build_is_deterministic_and_ignores_global_seed(tiny_cfg) -> None:
    torch.manual_seed(0)
    a = build_model(tiny_cfg.model).state_dict()
    torch.manual_seed(987654)
    torch.rand(100)
    rng_before = torch.get_rng_state()
    b = build_model(tiny_cfg.model).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the build does not consume the global RNG
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the weights are random (not a constant init): a different init_seed gives different weights
    other = tiny_cfg.model.copy()
    other.init_seed = int(tiny_cfg.model.init_seed) + 1
    c = build_model(other).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_shape_follows_the_preset(tiny_cfg) -> None:
    m = build_model(tiny_cfg.model)
    arch = tiny_cfg.model.arch
    assert m.config.vocab_size == BYTE_VOCAB_SIZE
    assert m.config.hidden_size == arch.hidden_size
    assert len(m.model.layers) == arch.num_hidden_layers
    assert m.lm_head.weight is m.get_input_embeddings().weight  # tied
    assert next(m.parameters()).dtype == torch.float32
    # tied weights are counted once
    unique = {id(p): p.numel() for p in m.parameters()}
    assert count_parameters(m)["total"] == sum(unique.values())


def test_tiny_bf16_dtype(tiny_cfg) -> None:
    mc = tiny_cfg.model.copy()
    mc.dtype = "bfloat16"
    m = build_model(mc)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    # same draw as the fp32 build, just rounded
    ref = build_model(tiny_cfg.model).state_dict()["model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(
        m.state_dict()["model.layers.0.mlp.up_proj.weight"].float(), ref, atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize(
    ("key", "value", "match"), [("dtype", "float8", "model.dtype"), ("init", "zeros", "model.init")]
)
def test_bad_model_values_raise(tiny_cfg, key: str, value: str, match: str) -> None:
    mc = tiny_cfg.model.copy()
    mc[key] = value
    with pytest.raises(ConfigError, match=match):
        build_model(mc)


def test_count_parameters_trainable_share() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    m[0].requires_grad_(False)
    c = count_parameters(m)
    assert c == {"total": 132, "trainable": 22, "trainable_pct": pytest.approx(100 * 22 / 132)}


# ---------------------------------------------------------------- presets on the meta device

PUBLISHED = {
    "qwen2.5-0.5b": 494e6,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-14b": 14.7e9,
    "llama3-8b": 8.03e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.0e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_model_matches_published_size(name: str) -> None:
    cfg = compose_train([f"model={name}"])
    assert cfg.model.name == name
    m = meta_model(cfg.model)
    params = list(m.parameters())
    assert params and all(p.is_meta for p in params)  # no memory, no weights
    total = count_parameters(m)["total"]
    assert total == pytest.approx(PUBLISHED[name], rel=0.02), f"{name}: {total / 1e9:.3f}B"


def test_all_presets_are_covered() -> None:
    from tests.helpers.compose import CONF

    presets = {p.stem for p in (CONF / "model").glob("*.yaml")}
    assert presets - {"tiny", "qwen2.5"} == set(PUBLISHED)


def test_qwen25_alias_is_7b() -> None:
    alias = compose_train(["model=qwen2.5"]).model
    seven = compose_train(["model=qwen2.5-7b"]).model
    assert OmegaConf.to_container(alias) == OmegaConf.to_container(seven)
    assert count_parameters(meta_model(alias))["total"] == pytest.approx(7.62e9, rel=0.02)


def test_lora_on_qwen25_7b_mlp_is_020_percent() -> None:
    cfg = compose_train(
        ["model=qwen2.5-7b", "adapter=lora", "adapter.target_modules=[up_proj,gate_proj,down_proj]"]
    )
    assert cfg.adapter.rank == 8
    m = meta_model(cfg.model)
    base_total = count_parameters(m)["total"]
    inject_adapters(m, cfg.adapter)
    layers = adapter_layers(m)
    n_layers = cfg.model.arch.num_hidden_layers
    assert len(layers) == 3 * n_layers
    c = count_parameters(m)
    h, i, r = cfg.model.arch.hidden_size, cfg.model.arch.intermediate_size, cfg.adapter.rank
    # up/gate: r (h + i) each, down: r (i + h)
    assert c["trainable"] == n_layers * 3 * r * (h + i)
    assert c["total"] == base_total + c["trainable"]
    assert c["trainable_pct"] == pytest.approx(0.20, abs=0.005)
    assert all(p.is_meta for p in m.parameters())


# ---------------------------------------------------------------- what a run dir keeps of the base model


def test_save_base_model_round_trip(tiny_cfg, tmp_path) -> None:
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from mtlora.run.base_model import fingerprint, save_base_model

    model = build_model(tiny_cfg.model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapters(model, tiny_cfg.adapter)
    out = save_base_model(tiny_cfg.model, model, build_tokenizer(tiny_cfg.model), tmp_path / "base_model")
    assert {p.name for p in out.iterdir()} == {"tokenizer", "source.json", "config.json", "model.safetensors"}

    weights = load_file(str(out / "model.safetensors"))
    assert not any("base_layer" in k or "lora_" in k for k in weights)  # original names, no adapter weights
    assert set(weights) == set(ref) - {"lm_head.weight"}  # tied head stored once
    for k, v in weights.items():
        assert torch.equal(v, ref[k]), k
    fresh = build_model(tiny_cfg.model)
    fresh.load_state_dict(weights, strict=False)
    assert torch.equal(fresh.lm_head.weight, ref["lm_head.weight"])

    source = json.loads((out / "source.json").read_text())
    assert source["model"]["name"] == "tiny" and source["model"]["init_seed"] == tiny_cfg.model.init_seed
    assert source["num_parameters"] == count_parameters(build_model(tiny_cfg.model))["total"]
    assert source["fingerprint_sha256"] == fingerprint(weights)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == tiny_cfg.model.arch.hidden_size

    reloaded = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == build_byte_tokenizer()(text)["input_ids"]


def test_zero3_partitioned_parameters_count_at_full_size(tiny_cfg, tmp_path) -> None:
    """Under ZeRO-3 a partitioned parameter is an empty tensor with ``ds_numel`` = its full size: counted at
    full size, and a base model left partitioned is neither hashed nor saved (``source.json`` says so)."""
    import json

    from mtlora.run.base_model import save_base_model

    model = build_model(tiny_cfg.model)
    inject_adapters(model, tiny_cfg.adapter)
    whole = count_parameters(model)
    for p in model.parameters():  # what zero.Init / prepare leave on each rank
        p.ds_numel, p.ds_id = p.numel(), 0
        p.data = torch.empty(0, dtype=p.dtype)
    assert count_parameters(model) == whole
    out = save_base_model(tiny_cfg.model, model, build_tokenizer(tiny_cfg.model), tmp_path / "base_model")
    source = json.loads((out / "source.json").read_text())
    assert source["num_parameters"] == whole["total"] - whole["trainable"]
    assert source["fingerprint_sha256"] is None and not (out / "model.safetensors").exists()
