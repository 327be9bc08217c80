"""Tokenize rendered examples and pad them into batches (loss on the answer tokens only)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch

from mtlora.utils.labels import IGNORE_INDEX  # noqa: F401  (re-exported for the data pipeline)


def tokenize_examples(ds: datasets.Dataset, tokenizer, max_seq_len: int) -> datasets.Dataset:
    """Add ``input_ids`` (prompt + target + EOS) and ``prompt_len``; over-long rows lose prompt-text tokens
    from the left first (the answer and the prompt's leading special tokens are kept), then target tokens
    from the right. ``prompt_cut`` / ``target_cut`` count the tokens each row lost, and ``prompt_tokens``
    its prompt-text tokens before the cut (:func:`truncation_report`).

    The prompt starts with the special tokens the tokenizer puts in front of a text by default (Llama's
    BOS; nothing for Qwen or the byte tokenizer), since prompt and target are tokenized separately."""
    eos = tokenizer.eos_token_id
    prefix = [t for t in tokenizer("", add_special_tokens=True)["input_ids"] if t != eos]

    def encode(batch):
        p_ids = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        t_ids = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
        ids, plen, pcut, tcut, ptok = [], [], [], [], []
        for p, t in zip(p_ids, t_ids):
            full_t = len(t) + 1
            t = (t + [eos])[: max_seq_len - 1 - len(prefix)]
            room = max(0, max_seq_len - len(t) - len(prefix))
            kept = p[max(0, len(p) - room) :]
            pcut.append(len(p) - len(kept))
            tcut.append(full_t - len(t))
            ptok.append(len(p))
            p = prefix + kept
            ids.append(p + t)
            plen.append(len(p))
        return {
            "input_ids": ids,
            "prompt_len": plen,
            "prompt_cut": pcut,
            "target_cut": tcut,
            "prompt_tokens": ptok,
        }

    return ds.map(encode, batched=True, desc="tokenize", load_from_cache_file=False)


#: a task whose rows lose more than this share of their prompt tokens to truncation, in more than this share
#: of its rows, is refused: the model would be trained (or scored) on answers to questions it cannot see
LOST_PROMPT_SHARE = 0.5


def truncation_report(ds: datasets.Dataset) -> dict[str, int]:
    """Counts over a :func:`tokenize_examples` dataset: ``rows``, ``cut`` (rows that lost tokens),
    ``prompt_lost`` (rows that lost more than :data:`LOST_PROMPT_SHARE` of their prompt tokens),
    ``target_cut`` (rows whose answer was cut)."""
    pcut, tcut, ptok = ds["prompt_cut"], ds["target_cut"], ds["prompt_tokens"]
    return {
        "rows": len(pcut),
        "cut": sum(1 for a, b in zip(pcut, tcut) if a or b),
        "prompt_lost": sum(1 for c, n in zip(pcut, ptok) if n and c > LOST_PROMPT_SHARE * n),
        "target_cut": sum(1 for b in tcut if b),
    }


def collate(
    examples: Sequence[dict], task_ids: Sequence[int], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples: ``input_ids``, ``attention_mask``, ``labels``, ``task_ids``;
    to the longest row, or to ``pad_to`` positions when given (``ValueError`` if a row is longer)."""
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"collate: a row of {width} tokens does not fit pad_to={pad_to}")
        width = pad_to
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e["input_ids"], dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        labels[i, e["prompt_len"] : len(ids)] = ids[e["prompt_len"] :]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "task_ids": torch.tensor(list(task_ids), dtype=torch.long),
    }
