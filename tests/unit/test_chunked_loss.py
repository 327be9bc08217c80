"""train.loss.impl=chunked (mtlora.losses.causal_lm): same per-token CE and adapter gradients as the full
fp32 logits, while no (B, L, V) logits tensor is ever materialised or saved for the backward."""

from __future__ import annotations

import pytest
import torch

from mtlora.adapters import inject_adapters
from mtlora.data.collate import collate
from mtlora.losses.causal_lm import causal_lm_loss, chunked_token_cross_entropy, head_bypassed
from mtlora.models import build_model
from tests.helpers.compose import compose_train


@pytest.fixture(scope="module")
def model():
    cfg = compose_train(["debug=smoke", "adapter.dropout=0.0"])
    m = build_model(cfg.model)
    inject_adapters(m, cfg.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0 (A's gradient would be 0): make every adapter weight live
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    m.train()  # adapter dropout 0: train mode stays deterministic
    return m


def _batch(vocab: int, lengths=(23, 9, 31, 17), prompt=(10, 3, 20, 5), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ex = [
        {"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist(), "prompt_len": p}
        for n, p in zip(lengths, prompt)
    ]
    return collate(ex, list(range(len(ex))), pad_id=0)


def _loss_and_grads(model, batch, impl, chunk=4096):
    model.zero_grad(set_to_none=True)
    ce, mask = causal_lm_loss(model, batch, impl, chunk)
    ce.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return ce.detach(), mask, grads


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_equals_full_loss_and_gradients(model, chunk: int) -> None:
    b = _batch(model.config.vocab_size)
    ce_f, mask_f, g_f = _loss_and_grads(model, b, "full")
    ce_c, mask_c, g_c = _loss_and_grads(model, b, "chunked", chunk)
    assert ce_c.shape == ce_f.shape == (4, b["input_ids"].size(1) - 1) and ce_c.dtype == torch.float32
    assert torch.equal(mask_c, mask_f)
    assert (ce_c[~mask_c] == 0).all()
    torch.testing.assert_close(ce_c, ce_f, rtol=1e-5, atol=1e-6)
    assert g_f and all(g.abs().sum() > 0 for g in g_f.values())
    for n in g_f:  # summation order differs per chunk: float32 rounding relative to the gradient's scale
        atol = 1e-4 * float(g_f[n].abs().max())
        torch.testing.assert_close(g_c[n], g_f[n], rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _logits_footprint(model, batch, impl, chunk):
    """(largest number of rows of V-wide logits the head produced, in forward or backward recompute;
    largest V-wide tensor saved for the backward) for one forward + backward."""
    vocab = model.config.vocab_size
    head = model.get_output_embeddings()
    rows, saved = [0], [0]

    def on_head(_m, _inp, out):
        if out.size(-1) == vocab:
            rows[0] = max(rows[0], out.numel() // vocab)

    def pack_hook(t):
        if t.dim() and t.size(-1) == vocab and not isinstance(t, torch.nn.Parameter):
            saved[0] = max(saved[0], t.numel())
        return t

    h = head.register_forward_hook(on_head)
    try:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            ce, _ = causal_lm_loss(model, batch, impl, chunk)
        ce.sum().backward()
    finally:
        h.remove()
    return rows[0], saved[0]


def test_chunked_never_holds_full_logits(model) -> None:
    b = _batch(model.config.vocab_size, lengths=(60, 48, 70, 33), prompt=(30, 20, 40, 10))
    vocab = model.config.vocab_size
    B, L = b["input_ids"].shape
    n_answer = int((b["labels"][:, 1:] != -100).sum())
    rows_f, saved_f = _logits_footprint(model, b, "full", 0)
    assert rows_f == B * L and saved_f >= B * (L - 1) * vocab  # the probe sees the full logits
    chunk = 16
    rows_c, saved_c = _logits_footprint(model, b, "chunked", chunk)
    assert 0 < rows_c <= chunk < n_answer
    assert saved_c <= chunk * vocab  # checkpointed chunks: at most one chunk's logits-sized tensor kept
    assert saved_c < B * (L - 1) * vocab // 10


def test_no_answer_tokens_gives_zero_loss_that_backprops(model) -> None:
    b = _batch(model.config.vocab_size)
    b["labels"][:] = -100
    ce, mask = causal_lm_loss(model, b, "chunked", 8)
    assert not mask.any() and (ce == 0).all()
    ce.sum().backward()


def test_head_bypass_is_restored(model) -> None:
    head = model.get_output_embeddings()
    x = torch.randn(2, model.config.hidden_size)
    with head_bypassed(head):
        assert head(x) is x
    assert "forward" not in head.__dict__ and head(x).size(-1) == model.config.vocab_size


def test_chunk_size_checked(model) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_cross_entropy(torch.zeros(1, 3, 4), torch.nn.Identity(), torch.zeros(1, 3).long(), 0)
    with pytest.raises(ValueError, match="train.loss.impl"):
        causal_lm_loss(model, _batch(model.config.vocab_size), "fused")
