"""Batched greedy generation (mtlora.eval.generate) equals a plain one-prompt-at-a-time forward-pass greedy
loop without cache: left padding, KV cache, task ids, merged adapters, stop strings, token budget, order."""

from __future__ import annotations

import pytest
import torch

from mtlora.adapters import inject_adapters, merge_adapters
from mtlora.eval.generate import greedy_generate, needs_task_ids, plan_batches
from mtlora.models import build_model, build_tokenizer
from tests.helpers.compose import compose_train

# deliberately not sorted by length (order must be restored) and of very different lengths (left padding)
PROMPTS = [
    "Q: 12+7=",
    "A much longer prompt, with more text in it: which way is north? A:",
    "x",
    "Sort the words: pear apple fig\nA:",
    "Is the following sentence plausible? Joao Moutinho caught the screen pass. A:",
]
N_NEW = 8


def _model(tmp_path, overrides=()):
    cfg = compose_train(list(overrides), run_dir=tmp_path)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model)
    if overrides:
        inject_adapters(model, cfg.adapter)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # non-zero adapter weights so that the adapter (and the task id) matters
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), tok


@torch.no_grad()
def _reference(model, tok, prompt, n_new, task_id=None):
    """Greedy, one prompt, full forward pass per token, no cache, no padding."""
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    ctx = getattr(model, "adapter_context", None)
    for _ in range(n_new):
        if ctx is not None:
            ctx.begin(task_ids=None if task_id is None else torch.tensor([task_id]))
        t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def ref_ids(tiny):
    return [_reference(*tiny, p, N_NEW) for p in PROMPTS]


def test_batched_left_padded_cached_equals_forward_loop(tiny, ref_ids):
    model, tok = tiny
    stats: dict = {}
    got = greedy_generate(
        model, tok, PROMPTS, N_NEW, batch_tokens=10**6, progress=False, stats=stats, return_ids=True
    )
    assert stats["batches"] == 1  # all five prompts in one left-padded batch
    ref = ref_ids
    assert got == ref
    assert len({tuple(r) for r in ref}) > 1  # the prompts do give different continuations
    # RoPE hides a constant position offset per row, so check the ids the model is given directly:
    # prefill counts from 0 at each row's first real token, then every step adds one
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        texts = greedy_generate(model, tok, PROMPTS, N_NEW, batch_tokens=10**6, progress=False)
    finally:
        hook.remove()
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda i: -lengths[i])
    for row, i in enumerate(order):
        assert seen[0][row, -lengths[i] :].tolist() == list(range(lengths[i]))
        assert [int(s[row, -1]) for s in seen[1:3]] == [lengths[i], lengths[i] + 1]
    assert texts == [tok.decode(r, skip_special_tokens=True) for r in ref]


def test_token_budget_splits_batches_and_restores_order(tiny, ref_ids):
    model, tok = tiny
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    budget = max(lengths) + 1  # the longest prompt alone; shorter ones pair up while longest*rows fits
    expected = plan_batches(lengths, budget)
    assert all(max(lengths[i] for i in b) * len(b) <= budget or len(b) == 1 for b in expected)
    assert sorted(i for b in expected for i in b) == list(range(len(PROMPTS)))
    assert [lengths[b[0]] for b in expected] == sorted((lengths[b[0]] for b in expected), reverse=True)
    stats: dict = {}
    got = greedy_generate(
        model, tok, PROMPTS, N_NEW, batch_tokens=budget, progress=False, stats=stats, return_ids=True
    )
    assert stats["batches"] == len(expected) > 2
    assert got == ref_ids  # back in input order


def test_plan_batches_budget_and_cap():
    assert plan_batches([10, 30, 20, 5], 60) == [[1, 2], [0, 3]]  # 30*2<=60, then 10*2
    assert plan_batches([10, 30, 20, 5], 29) == [[1], [2], [0, 3]]  # a too-long prompt runs alone
    assert plan_batches([1] * 5, 100, max_batch_size=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        plan_batches([1], 0)


def test_stop_strings_truncate_and_stop_early(tiny):
    model, tok = tiny
    full = greedy_generate(model, tok, PROMPTS, 24, progress=False)
    full_ids = greedy_generate(model, tok, PROMPTS, 24, progress=False, return_ids=True)
    # a stop string taken from the middle of a continuation: an ASCII character first seen at position >= 2
    k, text, stop = next(
        (k, t, c)
        for k, t in enumerate(full)
        for i, c in enumerate(t)
        if i >= 2 and c.isascii() and c not in t[:i]
    )
    cut = text[: text.find(stop)]
    got = greedy_generate(model, tok, PROMPTS, 24, stop=(stop,), progress=False)
    assert got[k] == cut and len(cut) < len(text)
    for g, f in zip(got, full):  # every row is cut at its first stop string (or not at all)
        assert g == (f[: f.find(stop)] if stop in f else f)
    ids = greedy_generate(model, tok, PROMPTS, 24, stop=(stop,), progress=False, return_ids=True)
    assert len(ids[k]) < len(full_ids[k])  # generation of that row stopped early
    # with a stop string every row hits, the whole batch stops early (ids end at the stop token)
    assert tok.decode(ids[k], skip_special_tokens=True).endswith(stop)


def test_task_aware_adapter_gets_per_row_task_ids(tmp_path):
    model, tok = _model(tmp_path, ["adapter=mtl_lora"])
    assert needs_task_ids(model)
    prompts, task_ids, n_new = PROMPTS[:3], [2, 0, 1], 6  # mixed lengths and mixed tasks in one batch
    got = greedy_generate(model, tok, prompts, n_new, task_ids=task_ids, progress=False, return_ids=True)
    ref = [_reference(model, tok, p, n_new, t) for p, t in zip(prompts, task_ids)]
    assert got == ref
    # the task id matters: the same prompts under one task id for every row give other continuations
    single = greedy_generate(model, tok, prompts, n_new, task_ids=1, progress=False, return_ids=True)
    assert single[2] == ref[2] and single != ref
    assert single[0] == _reference(model, tok, prompts[0], n_new, 1)
    with pytest.raises(ValueError, match="task id"):
        greedy_generate(model, tok, prompts, n_new, progress=False)


def test_merged_adapter_generates_like_unmerged(tmp_path):
    model, tok = _model(tmp_path, ["adapter=lora"])
    unmerged = greedy_generate(model, tok, PROMPTS, N_NEW, progress=False, return_ids=True)
    base_like = _model(tmp_path)[0]
    assert unmerged != greedy_generate(base_like, tok, PROMPTS, N_NEW, progress=False, return_ids=True)
    merge_adapters(model)
    assert greedy_generate(model, tok, PROMPTS, N_NEW, progress=False, return_ids=True) == unmerged


def _stop_hit_at_different_steps(model, tok, prompts, n_new, task_ids=None):
    """A stop string (one ASCII character) that some rows generate and others do not, and the full texts."""
    full = greedy_generate(model, tok, prompts, n_new, task_ids=task_ids, progress=False)
    for c in sorted({c for t in full for c in t if c.isascii() and c.isprintable()}):
        hits = [t.find(c) for t in full]
        if len({h for h in hits if h >= 0}) >= 2 or (0 < sum(h >= 0 for h in hits) < len(full)):
            return c, full
    pytest.skip("no stop character separates the rows")  # pragma: no cover - the fixed seed provides one


def test_finished_rows_leave_the_batch_and_the_rest_is_unchanged(tmp_path, monkeypatch):
    """Rows that hit a stop string are dropped from the batch (KV cache, mask, positions and the adapters'
    task ids); the other rows generate exactly what they generate alone, and what the no-drop path gives."""
    import mtlora.eval.generate as gen

    model, tok = _model(tmp_path, ["adapter=mtl_lora"])
    prompts, task_ids, n_new = PROMPTS, [2, 0, 1, 0, 2], 16
    stop, full = _stop_hit_at_different_steps(model, tok, prompts, n_new, task_ids)
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = greedy_generate(model, tok, prompts, n_new, stop=(stop,), task_ids=task_ids, progress=False)
    finally:
        hook.remove()
    assert got == [f[: f.find(stop)] if stop in f else f for f in full]
    assert rows_seen[0] == len(prompts) and min(rows_seen) < len(prompts)  # the batch shrank
    assert rows_seen == sorted(rows_seen, reverse=True)
    # each row equals its own one-prompt, one-task reference decode, cut at the stop string
    for p, t, g in zip(prompts, task_ids, got):
        ref = tok.decode(_reference(model, tok, p, n_new, t), skip_special_tokens=True)
        assert g == (ref[: ref.find(stop)] if stop in ref else ref)
    # a cache that cannot drop rows: the finished rows keep running and are ignored, same result
    monkeypatch.setattr(gen, "_select_rows", lambda cache, keep: False)
    assert greedy_generate(model, tok, prompts, n_new, stop=(stop,), task_ids=task_ids, progress=False) == got


def test_stop_window_sees_multi_token_stop_strings(tiny):
    """A stop string longer than one token (a whole later chunk of a continuation) is still found."""
    model, tok = tiny
    full = greedy_generate(model, tok, PROMPTS, 24, progress=False)
    text = max(full, key=len)
    stop = text[10:16]  # six characters from the middle: several tokens with the byte tokenizer
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 1
    got = greedy_generate(model, tok, PROMPTS, 24, stop=(stop,), progress=False)
    assert got == [f[: f.find(stop)] if stop in f else f for f in full]


@pytest.mark.parametrize("side", ["left", "right"])
def test_max_input_tokens_truncates_prompts_like_generating_from_the_kept_tokens(tiny, side):
    model, tok = tiny
    n = 6
    stats: dict = {}
    got = greedy_generate(
        model, tok, PROMPTS, N_NEW, progress=False, return_ids=True, max_input_tokens=n,
        truncation_side=side, stats=stats,
    )  # fmt: skip
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    kept = [(x[-n:] if side == "left" else x[:n]) for x in ids]
    assert stats["truncated"] == sum(len(x) > n for x in ids) > 0
    for g, k in zip(got, kept):
        ref: list[int] = []
        with torch.no_grad():
            for _ in range(N_NEW):
                t = int(model(input_ids=torch.tensor([k + ref])).logits[0, -1].argmax())
                if t == tok.eos_token_id:
                    break
                ref.append(t)
        assert g == ref
    with pytest.raises(ValueError, match="truncation_side"):
        greedy_generate(model, tok, PROMPTS, 1, progress=False, max_input_tokens=4, truncation_side="middle")


def test_model_merged_for_one_task_generates_that_task_and_refuses_others(tmp_path):
    model, tok = _model(tmp_path, ["adapter=mtl_lora"])
    unmerged = greedy_generate(model, tok, PROMPTS[:3], 6, task_ids=2, progress=False, return_ids=True)
    merge_adapters(model, task_id=2)
    assert greedy_generate(model, tok, PROMPTS[:3], 6, progress=False, return_ids=True) == unmerged
    assert (
        greedy_generate(model, tok, PROMPTS[:3], 6, task_ids=2, progress=False, return_ids=True) == unmerged
    )
    with pytest.raises(ValueError, match="merged for task 2"):
        greedy_generate(model, tok, PROMPTS[:3], 6, task_ids=[2, 0, 2], progress=False)


def test_rows_are_dropped_only_from_plain_dynamic_caches():
    from transformers.cache_utils import DynamicCache

    from mtlora.eval.generate import _select_rows

    cache = DynamicCache()
    k = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).reshape(3, 2, 4, 5)
    cache.update(k, k + 1, 0)
    assert _select_rows(cache, torch.tensor([0, 2]))
    kept = cache.layers[0].keys
    assert kept.shape[0] == 2 and torch.equal(kept, k[[0, 2]])

    class StateLayer:  # e.g. a linear-attention layer: recurrent states beside the keys
        def batch_select_indices(self, keep):  # pragma: no cover - must not be called
            raise AssertionError("a layer with other state must not be trimmed")

    class Mixed:
        layers = [cache.layers[0], StateLayer()]
        batch_select_indices = DynamicCache.batch_select_indices

    assert not _select_rows(Mixed(), torch.tensor([0]))
    assert cache.layers[0].keys.shape[0] == 2  # untouched: all layers are checked before any is trimmed
    assert not _select_rows(None, torch.tensor([0])) and not _select_rows((k, k), torch.tensor([0]))


def test_truncation_keeps_the_special_tokens_the_tokenizer_adds(tiny):
    """A tokenizer that adds BOS: the cut prompt still starts with BOS, and only its text is shortened."""
    from mtlora.eval.generate import special_spans, truncate_prompts

    model, tok = tiny
    bos = tok.eos_token_id  # any id the text never produces will do

    class WithBos:
        def __init__(self, inner):
            self._inner = inner

        def __call__(self, text, add_special_tokens=True):
            ids = self._inner(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([bos] if add_special_tokens else []) + ids}

        def __getattr__(self, name):
            return getattr(self._inner, name)

    btok = WithBos(tok)
    n = 6
    plain = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    stats: dict = {}
    got = greedy_generate(
        model, btok, PROMPTS, 1, progress=False, return_ids=True, max_input_tokens=n, stats=stats,
        truncation_side="left",
    )  # fmt: skip
    assert stats["truncated"] == sum(len(x) + 1 > n for x in plain) > 0
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        greedy_generate(model, btok, PROMPTS[:2], 1, progress=False, max_input_tokens=n, batch_tokens=1)
    finally:
        hook.remove()
    for ids, x in zip(seen, plain[:2]):  # batch_tokens=1: one prompt per batch, no padding
        row = ids[0].tolist()
        assert row == ([bos] + x if len(x) + 1 <= n else [bos, *x[-(n - 1) :]])
    assert len(got) == len(PROMPTS)
    assert special_spans([bos, 5, 6], [5, 6]) == (1, 0) and special_spans([5, 6, 9], [5, 6]) == (0, 1)
    assert special_spans([5, 6], [5, 6]) == (0, 0) and special_spans([7, 5], [5, 6]) == (0, 0)
    cut, k = truncate_prompts([[1, 2, 3, 4, 5, 9]], 4, "right", [(1, 1)])
    assert cut == [[1, 2, 3, 9]] and k == 1


class _WithBos:
    """The tiny byte tokenizer, adding ``bos`` in front when ``add_special_tokens`` (as Llama's does)."""

    def __init__(self, inner, bos: int):
        self._inner, self._bos = inner, bos

    def __call__(self, text, add_special_tokens=True):
        ids = self._inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self._bos] if add_special_tokens else []) + ids}

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_truncate_special_tokens_cuts_the_encoded_ids_bos_included(tiny):
    """lm-eval's left truncation (``encoding["input_ids"][:, -left_truncate_len:]`` of the left-padded batch)
    keeps each row's last n ids, BOS or not: the rows the model sees are ``tok(prompt)[-n:]``."""
    model, tok = tiny
    btok = _WithBos(tok, tok.eos_token_id)
    n = 7
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"]) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    stats: dict = {}
    try:
        greedy_generate(
            model, btok, PROMPTS, 1, progress=False, max_input_tokens=n, batch_tokens=1, stats=stats,
            truncation_side="left", truncate_special_tokens=True,
        )  # fmt: skip
    finally:
        hook.remove()
    bos = tok.eos_token_id
    full = [[bos, *tok(p, add_special_tokens=False)["input_ids"]] for p in PROMPTS]
    rows = sorted(ids[0].tolist() for ids in seen)  # batches run longest first: compare sorted
    assert rows == sorted(x[-n:] for x in full)
    assert stats["truncated"] == sum(len(x) > n for x in full) > 0
    assert sum(r[0] == bos for r in rows) == sum(len(x) <= n for x in full) > 0  # BOS only in uncut rows


def test_model_max_length_is_looked_up_as_lm_eval_does():
    """lm-eval's HF model: text_config first, then n_positions / max_position_embeddings / n_ctx (in that
    order), then the tokenizer's model_max_length unless it is the 'no limit' int(1e30), then 2048."""
    from types import SimpleNamespace as NS

    from mtlora.eval.generate import model_max_length

    assert model_max_length(NS(n_positions=1024, max_position_embeddings=4096)) == 1024
    assert model_max_length(NS(max_position_embeddings=4096, n_ctx=77)) == 4096
    assert model_max_length(NS(text_config=NS(max_position_embeddings=32768), n_ctx=1200)) == 32768
    assert model_max_length(NS(), NS(model_max_length=300)) == 300
    assert model_max_length(NS(), NS(model_max_length=1000000000000000019884624838656)) == 2048
    assert model_max_length(None, None) == 2048
    cfg = compose_train([])
    assert model_max_length(build_model(cfg.model).config, build_tokenizer(cfg.model)) == 512
