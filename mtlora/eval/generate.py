"""Batched greedy generation for evaluation: length-sorted batches under a token budget, left padding,
KV cache, stop strings, task ids for task-aware adapters.

``greedy_generate(model, tokenizer, prompts, max_new_tokens, stop=..., batch_tokens=..., task_ids=...)``
returns one continuation per prompt (prompt excluded, in the order of ``prompts``), cut at the first EOS
and at the earliest stop string.

Our own decode loop rather than ``model.generate``: the loop is a few lines, gives exact control over
what the equivalence test checks (position ids and attention mask under left padding, the cache, the
per-row stop condition), ignores whatever sampling defaults a checkpoint's ``generation_config`` ships
(Align-LoRA's harness is exposed to that), keeps ``model.adapter_context`` under our control for the whole
batch, and matches stop strings on decoded text (``generate``'s token-level ``stop_strings`` needs the
tokenizer's vocabulary and is fragile with byte-level tokenizers).

Batching: prompts are tokenized, sorted by length (longest first, so an out-of-memory shows on the first
batch), and cut into batches whose ``longest prompt x rows <= batch_tokens`` (and ``rows <=
max_batch_size``); a prompt longer than the budget runs alone. Outputs are put back in input order. Rows that
finish (EOS or a stop string) leave the batch, KV cache included, so a batch costs what its still-running rows
cost; stop strings are matched on the decoded last few tokens of a row (linear, not quadratic, in the length).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mtlora.run.progress import min_interval


def needs_task_ids(model: torch.nn.Module) -> bool:
    """Whether some adapter layer of ``model`` reads ``context.task_ids`` (and is not merged)."""
    return any(
        getattr(m, "needs_task_ids", False) and not getattr(m, "merged", False) for m in model.modules()
    )


def merged_for_a_task(model: torch.nn.Module) -> bool:
    """Whether some task-aware adapter layer of ``model`` is merged for one task (``merge(task_id=t)``)."""
    return any(getattr(m, "merged_task", None) is not None for m in model.modules())


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first, cut so that ``max(len) * rows <= batch_tokens``."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]  # sorted: the first row is the longest
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and (full or longest * (len(cur) + 1) > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for v in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


def special_spans(enc: Sequence[int], plain: Sequence[int]) -> tuple[int, int]:
    """``(head, tail)``: how many ids the tokenizer's special tokens add before and after the text, from the
    ids of one prompt with (``enc``) and without (``plain``) special tokens; ``(0, 0)`` when they differ
    otherwise (then the whole ``enc`` counts as text)."""
    extra = len(enc) - len(plain)
    if extra <= 0:
        return 0, 0
    if list(enc[extra:]) == list(plain):
        return extra, 0
    if list(enc[: len(plain)]) == list(plain):
        return 0, extra
    return 0, 0


def truncate_prompts(
    enc: list[list[int]],
    max_input_tokens: int | None,
    side: str = "left",
    special: Sequence[tuple[int, int]] | None = None,
) -> tuple[list[list[int]], int]:
    """Token id lists cut to ``max_input_tokens``, and how many were cut (``None``: kept whole).

    Only the text is cut, as a Hugging Face tokenizer with ``truncation=True`` does: ``special[i] = (head,
    tail)`` ids of prompt ``i`` (BOS, ...; :func:`special_spans`) are kept. ``left`` keeps the end of the text
    (the question), ``right`` its start (Hugging Face's default ``truncation_side``)."""
    if side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {side!r}")
    if max_input_tokens is None:
        return enc, 0
    if max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be >= 1 or None, got {max_input_tokens}")
    out, n_cut = [], 0
    for i, x in enumerate(enc):
        if len(x) <= max_input_tokens:
            out.append(x)
            continue
        head, tail = special[i] if special is not None else (0, 0)
        keep = max(max_input_tokens - head - tail, 1)
        text = x[head : len(x) - tail]
        text = text[-keep:] if side == "left" else text[:keep]
        out.append([*x[:head], *text, *x[len(x) - tail :]])
        n_cut += 1
    return out, n_cut


#: ``tokenizer.model_max_length`` of a tokenizer that sets none (``int(1e30)``): "no limit", not a length
TOKENIZER_NO_LIMIT = int(1e30)
#: the context length assumed when neither the model config nor the tokenizer gives one
DEFAULT_MODEL_MAX_LENGTH = 2048
#: config attributes holding the context length, in lm-eval's order
MODEL_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


def model_max_length(config, tokenizer=None, default: int = DEFAULT_MODEL_MAX_LENGTH) -> int:
    """The model's context length, looked up as lm-eval's Hugging Face model does: the first of
    ``n_positions``, ``max_position_embeddings``, ``n_ctx`` set on ``config.text_config`` (composite
    configs) or else on ``config``; then ``tokenizer.model_max_length`` unless it is the "no limit" value;
    then ``default``. ``config``: a model config or None."""
    cfg = getattr(config, "text_config", None) or config
    for attr in MODEL_LENGTH_ATTRS:
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    n = getattr(tokenizer, "model_max_length", None)
    if n is not None and int(n) != TOKENIZER_NO_LIMIT:
        return int(n)
    return int(default)


def truncate_at_first_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut at the earliest occurrence of any stop string; whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _row_task_ids(task_ids, rows: list[int], device) -> torch.Tensor | None:
    if task_ids is None:
        return None
    if isinstance(task_ids, int):
        return torch.full((len(rows),), task_ids, dtype=torch.long, device=device)
    return torch.tensor([int(task_ids[i]) for i in rows], dtype=torch.long, device=device)


def _forward_kwargs(model) -> tuple[str, dict]:
    """The cache keyword of ``model.forward`` (transformers 5.x ``cache``; ``past_key_values`` before) and
    ``logits_to_keep=1`` where supported (no full-vocabulary logits over the whole prompt)."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _stop_window(stop: Sequence[str]) -> int:
    """How many trailing tokens to decode to see every stop string that the newest token can complete.

    A stop string of ``b`` UTF-8 bytes spans at most ``b`` tokens (every token decodes to at least one byte);
    a few more cover leading partial characters and tokenizers that drop a leading space on decode."""
    return max((len(s.encode()) for s in stop), default=0) + 8


def _row_droppable_layer_types() -> tuple[type, ...]:
    """Cache layer classes holding nothing but per-row keys and values (``batch_select_indices`` is exact)."""
    from transformers import cache_utils

    names = ("DynamicLayer", "DynamicSlidingWindowLayer")
    return tuple(getattr(cache_utils, n) for n in names if hasattr(cache_utils, n))


def _select_rows(cache, keep: torch.Tensor) -> bool:
    """Keep only the batch rows ``keep`` of a KV cache in place; False (cache untouched) unless every layer is
    a plain dynamic key/value layer: static caches cannot drop rows, and linear-attention or hybrid layers
    hold recurrent states that ``batch_select_indices`` would leave at the full batch."""
    layers = getattr(cache, "layers", None)
    safe = _row_droppable_layer_types()
    if not layers or not hasattr(cache, "batch_select_indices") or any(type(x) not in safe for x in layers):
        return False
    cache.batch_select_indices(keep)
    return True


@torch.inference_mode()
def _generate_batch(
    model, tokenizer, ids: list[list[int]], max_new_tokens: int, stop, eos, pad, row_task_ids=None
) -> list[list[int]]:
    """Generated token ids of one left-padded batch (EOS excluded; up to the token completing a stop string).

    Finished rows leave the batch: their rows of the KV cache, the attention mask, the positions and the
    adapters' task ids are dropped, so the remaining steps only compute the rows still generating. Stop
    strings are looked for in the decoded last :func:`_stop_window` tokens of a row, not its whole output.
    """
    device = next(model.parameters()).device
    ctx = getattr(model, "adapter_context", None)
    n, width = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for r, x in enumerate(ids):  # left padding: the last prompt token of every row is at column width-1
        input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))  # batch row -> input row, for the rows still generating
    cache = None
    step_ids, step_pos = input_ids, position_ids
    window = _stop_window(stop)
    cache_kw, extra = _forward_kwargs(model)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **{cache_kw: cache},
            **extra,
        )
        cache = getattr(out, cache_kw, None)
        nxt = out.logits[:, -1, :].argmax(-1)
        keep: list[int] = []
        for b, t in enumerate(nxt.tolist()):
            r = active[b]
            if r < 0 or t in eos:  # r < 0: finished row that the cache could not drop
                continue
            out_tokens[r].append(t)
            if stop:
                tail = tokenizer.decode(out_tokens[r][-window:], skip_special_tokens=True)
                if any(s in tail for s in stop):
                    continue
            keep.append(b)
        if not keep:
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if len(keep) < len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            if _select_rows(cache, idx):
                step_ids, step_pos, mask = step_ids[idx], step_pos[idx], mask[idx]
                active = [active[b] for b in keep]
                if ctx is not None and row_task_ids is not None:
                    row_task_ids = row_task_ids[idx]
                    ctx.begin(task_ids=row_task_ids)
            else:  # the cache cannot drop rows: keep computing them, discard what they generate
                kept = set(keep)
                active = [a if b in kept else -1 for b, a in enumerate(active)]
    return out_tokens


def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_tokens: int = 16384,
    task_ids: int | Sequence[int] | None = None,
    progress: bool = True,
    max_batch_size: int | None = 64,
    add_special_tokens: bool = True,
    desc: str = "generate",
    stats: dict | None = None,
    return_ids: bool = False,
    max_input_tokens: int | None = None,
    truncation_side: str = "left",
    truncate_special_tokens: bool = False,
) -> list[str] | list[list[int]]:
    """Greedy continuations of ``prompts`` (see the module doc).

    ``task_ids``: one training-task id for every prompt (int) or one per prompt; required when an unmerged
    adapter layer needs task ids (a ``ValueError`` otherwise). ``stats``, when given, receives
    ``batches`` (the number of batches), ``batch_sizes`` and ``truncated`` (prompts cut to
    ``max_input_tokens``, :func:`truncate_prompts`: the special tokens the tokenizer adds, such as BOS, are
    kept; ``truncation_side="left"`` keeps the end of the text, ``"right"`` its start, which is Hugging Face's
    default side; ``truncate_special_tokens=True`` cuts the encoded ids as they are, special tokens
    included, as lm-eval's left truncation of the encoded context does). ``return_ids``: the generated token
    ids instead (EOS excluded; up to and including the token that completed a stop string).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = tuple(s for s in stop if s)
    ctx = getattr(model, "adapter_context", None)
    if needs_task_ids(model):
        if task_ids is None:
            raise ValueError(
                "the model's adapter needs one task id per row (task-aware adapter, not merged); pass task_ids"
            )
    elif not merged_for_a_task(model):
        task_ids = None  # kept for a model merged for one task: its layers refuse rows of other tasks
    if task_ids is not None and not isinstance(task_ids, int) and len(task_ids) != len(prompts):
        raise ValueError(f"task_ids has {len(task_ids)} entries for {len(prompts)} prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    eos = _eos_ids(model, tokenizer)
    enc = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if any(len(x) == 0 for x in enc):
        raise ValueError("a prompt tokenizes to zero tokens")
    special = None  # the special tokens of the prompts to cut (others are not tokenized again)
    if max_input_tokens is not None and add_special_tokens and not truncate_special_tokens:
        special = [
            special_spans(x, tokenizer(p, add_special_tokens=False)["input_ids"])
            if len(x) > max_input_tokens
            else (0, 0)
            for x, p in zip(enc, prompts)
        ]
    enc, truncated = truncate_prompts(enc, max_input_tokens, truncation_side, special)
    batches = plan_batches([len(x) for x in enc], batch_tokens, max_batch_size)
    if stats is not None:
        stats["batches"] = len(batches)
        stats["batch_sizes"] = [len(b) for b in batches]
        stats["truncated"] = truncated
    was_training = model.training
    model.eval()
    results: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    bar = tqdm(
        total=len(prompts), disable=not progress, desc=desc, dynamic_ncols=True, mininterval=min_interval()
    )
    try:
        for rows in batches:
            row_task_ids = _row_task_ids(task_ids, rows, device)
            if ctx is not None:
                ctx.begin(task_ids=row_task_ids)
            gens = _generate_batch(
                model, tokenizer, [enc[i] for i in rows], max_new_tokens, stop, eos, pad, row_task_ids
            )
            for i, toks in zip(rows, gens):
                if return_ids:
                    results[i] = toks
                else:
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    results[i] = truncate_at_first_stop(text, stop)[0] if stop else text
            bar.update(len(rows))
    finally:
        bar.close()
        if ctx is not None:
            ctx.begin()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]
