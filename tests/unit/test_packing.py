"""data.packing (mtlora.data.packing): rows of several examples with restarting positions, no target at an
example's first token, no attention across examples (transformers' packed mask from position_ids), the
same per-example losses as the padded batch, and the config conflicts it refuses."""

from __future__ import annotations

import pytest
import torch

from mtlora.adapters import inject_adapters
from mtlora.config import validate_config
from mtlora.data import build_data
from mtlora.data.collate import IGNORE_INDEX, collate
from mtlora.data.packing import pack, pack_rows
from mtlora.errors import ConfigError
from mtlora.losses.causal_lm import causal_lm_loss, model_inputs
from mtlora.models import build_model, build_tokenizer
from tests.helpers.compose import compose_train


def _examples(vocab: int, lengths=(23, 9, 31, 17, 12, 40), prompt=(10, 0, 20, 5, 3, 30), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist(), "prompt_len": p}
        for n, p in zip(lengths, prompt)
    ]


def _model(attn: str = "sdpa"):
    cfg = compose_train(["debug=smoke", "adapter.dropout=0.0", f"model.attn_implementation={attn}"])
    m = build_model(cfg.model)
    inject_adapters(m, cfg.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def test_pack_rows_first_fit() -> None:
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="pack_tokens=8"):
        pack_rows([9], 8)


def test_pack_layout() -> None:
    ex = [
        {"input_ids": [11, 12, 13, 14], "prompt_len": 2},
        {"input_ids": [21, 22, 23], "prompt_len": 0},  # empty prompt: its first token is still no target
        {"input_ids": [31, 32, 33, 34, 35, 36], "prompt_len": 3},
    ]
    b = pack(ex, [0, 2, 1], pad_id=0, pack_tokens=8)
    # rows are padded to the longest row (7), not to pack_tokens
    assert b["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23], [31, 32, 33, 34, 35, 36, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0]]
    x = IGNORE_INDEX
    assert b["labels"].tolist() == [[x, x, 13, 14, x, 22, 23], [x, x, x, 34, 35, 36, x]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert b["task_ids"].tolist() == [0, 1]
    assert b["token_task_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 2], [1] * 6 + [-1]]


def _example_index(ex, pack_tokens):
    """For the packed batch: (row, start, length) of every example, in example order."""
    rows = pack_rows([len(e["input_ids"]) for e in ex], pack_tokens)
    where = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            where[i] = (r, at, len(ex[i]["input_ids"]))
            at += len(ex[i]["input_ids"])
    return [where[i] for i in range(len(ex))]


@pytest.mark.parametrize("impl", ["full", "chunked"])
def test_packed_losses_equal_padded(model, impl: str) -> None:
    ex = _examples(model.config.vocab_size)
    padded = collate(ex, list(range(len(ex))), pad_id=0)
    packed = pack(ex, list(range(len(ex))), pad_id=0, pack_tokens=64)
    assert packed["input_ids"].size(0) < len(ex)  # several examples share rows
    with torch.no_grad():
        ce_p, m_p = causal_lm_loss(model, padded, impl, 16)
        ce_k, m_k = causal_lm_loss(model, packed, impl, 16)
    assert int(m_p.sum()) == int(m_k.sum())
    for i, (r, s, n) in enumerate(_example_index(ex, 64)):
        # padded row i positions [0, n-1) == packed row r positions [s, s+n-1)
        assert torch.equal(m_k[r, s : s + n - 1], m_p[i, : n - 1])
        torch.testing.assert_close(ce_k[r, s : s + n - 1], ce_p[i, : n - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce_k[r, s : s + n - 1].sum(), ce_p[i].sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_across_examples(attn: str) -> None:
    m = _model(attn)
    ex = _examples(m.config.vocab_size, lengths=(20, 15, 25), prompt=(5, 5, 5))
    b = pack(ex, [0, 1, 2], pad_id=0, pack_tokens=64)
    assert b["input_ids"].size(0) == 1
    (r0, s0, n0), (_, s1, n1), (_, s2, n2) = _example_index(ex, 64)
    perturbed = {k: v.clone() for k, v in b.items()}
    perturbed["input_ids"][0, s0 : s0 + n0] = torch.randint(3, m.config.vocab_size, (n0,))
    with torch.no_grad():
        a = m(**model_inputs(b)).logits
        p = m(**model_inputs(perturbed)).logits
        # the same row with a plain causal mask: example 1 would see example 0 (the probe has teeth)
        leak_a = m(input_ids=b["input_ids"]).logits
        leak_p = m(input_ids=perturbed["input_ids"]).logits
    assert not torch.allclose(a[0, s0 : s0 + n0], p[0, s0 : s0 + n0])
    torch.testing.assert_close(p[0, s1:], a[0, s1:], rtol=0, atol=1e-6)
    assert not torch.allclose(leak_a[0, s1 : s1 + n1], leak_p[0, s1 : s1 + n1], atol=1e-3)
    # and each example's logits are those of the example alone at positions 0..n-1
    with torch.no_grad():
        alone = m(input_ids=torch.tensor([ex[2]["input_ids"]])).logits
    torch.testing.assert_close(a[0, s2 : s2 + n2], alone[0], rtol=1e-5, atol=1e-5)


def test_multitask_data_batch_packs() -> None:
    cfg = compose_train(["debug=smoke", "+data.packing=true", "data.budget=64"])
    data = build_data(cfg.data, build_tokenizer(cfg.model), int(cfg.model.max_seq_len))
    assert data.pack_tokens == cfg.model.max_seq_len
    pairs = data.schedule.epoch_order(0)[:8]
    b = data.batch(pairs)
    unpacked = collate(
        [data.train[int(t)][int(i)] for t, i in pairs], [int(t) for t, _ in pairs], data.pad_id
    )
    assert {"position_ids", "token_task_ids"} <= set(b)
    assert b["input_ids"].size(0) <= len(pairs) and b["input_ids"].size(1) <= cfg.model.max_seq_len
    assert int(b["attention_mask"].sum()) == int(unpacked["attention_mask"].sum())
    assert int((b["labels"] != -100).sum()) == int((unpacked["labels"] != -100).sum())
    assert sorted(b["token_task_ids"][b["token_task_ids"] >= 0].tolist()) == sorted(
        unpacked["task_ids"].repeat_interleave(unpacked["attention_mask"].sum(1)).tolist()
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["adapter=mtl_lora"], "adapter.method=mtl_lora routes by task"),
        (["adapter=moelora"], "adapter.method=moelora routes by task"),
        (["adapter=lora_split"], "lora_split with split_routing=task"),
        (["adapter=meta_lora"], "MeTA-LoRA"),
        (["alignment=kl"], "alignment=kl"),
        (["adapter=lorahub"], "adapter.method=lorahub"),
        (["+data.pack_tokens=32"], "data.pack_tokens=32"),
    ],
)
def test_packing_conflicts_are_config_errors(overrides, match: str) -> None:
    cfg = compose_train(["+data.packing=true", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


def test_packing_allowed_for_plain_and_untasked_adapters() -> None:
    for extra in ([], ["adapter=lora_split", "adapter.split_routing=none"], ["adapter=hydralora"]):
        validate_config(compose_train(["+data.packing=true", "+data.pack_tokens=256", *extra]))
    with pytest.raises(ConfigError, match="data.packing"):
        validate_config(compose_train(["+data.packing=3"]))
