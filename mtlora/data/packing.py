"""Padding-free sequence packing of a micro-batch (``data.packing``, ``data.pack_tokens``).

The examples of a micro-batch are packed, in order (first fit), into as few rows of at most
``pack_tokens`` tokens as they fit in; the rows are right-padded to the longest row only. Every example
keeps its own ``position_ids`` (restarting at 0), its first token is never a target (labels -100, as in an
unpacked row, so no example predicts the next example's first token), and ``token_task_ids`` holds the
task id of every token (-1 on padding) for the per-task loss log.

Attention never crosses examples: the batch carries ``position_ids`` and the loss passes
``attention_mask=None`` (:func:`mtlora.losses.causal_lm.model_inputs`). transformers 5.x then detects the
packed format from the positions (``masking_utils.find_packed_sequence_indices``: a new sequence starts
wherever a position is not the previous one + 1) and ands a block-diagonal mask into the causal mask
(``packed_sequence_mask_function``) for the sdpa, eager and flex paths; flash-attention derives
``cu_seq_lens`` from the same positions. The trailing padding of a row is its own sequence (positions from
0), masked out of the loss. The ``attention_mask`` of a packed batch (1 on real tokens) is only used to
count tokens, never passed to the model.

A packed row holds examples of several tasks, so packing is for adapters that do not route by task; the
config check (:func:`packing_conflicts`) refuses task-aware adapters, task-routed lora_split, MeTA-LoRA
and alignment losses, which all need one task per row, and LoraHub (its few-shot objective scores rows
with their padding mask). Only the training loop packs; held-in eval and diagnostics collate padded rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlora.data.collate import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row: first fit in the given order, at most ``capacity`` tokens a row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit data.pack_tokens={capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack(
    examples: Sequence[dict], task_ids: Sequence[int], pad_id: int, pack_tokens: int
) -> dict[str, torch.Tensor]:
    """Pack tokenized examples (``input_ids``, ``prompt_len``) into rows: ``input_ids``, ``position_ids``,
    ``attention_mask`` (token count only), ``labels``, ``task_ids`` (per row: the first example's task, for
    adapters that ignore it), ``token_task_ids`` (per token, -1 on padding)."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], int(pack_tokens))
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    token_tasks = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            ids = torch.tensor(e["input_ids"], dtype=torch.long)
            k = len(ids)
            input_ids[r, at : at + k] = ids
            mask[r, at : at + k] = 1
            positions[r, at : at + k] = torch.arange(k)
            start = max(int(e["prompt_len"]), 1)  # the first token of an example is never a target
            labels[r, at + start : at + k] = ids[start:]
            token_tasks[r, at : at + k] = int(task_ids[i])
            at += k
        positions[r, at:] = torch.arange(width - at)  # the padding tail: a sequence of its own
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_mask": mask,
        "labels": labels,
        "task_ids": torch.tensor([int(task_ids[row[0]]) for row in rows], dtype=torch.long),
        "token_task_ids": token_tasks,
    }


def packing_conflicts(cfg, adapter_conflict: str | None = None) -> list[str]:
    """Why ``data.packing=true`` cannot be used with this composed train config (empty: it can).

    ``adapter_conflict``: the adapter method's own reason, handed in by the caller from the method's spec
    (:meth:`mtlora.adapters.spec.MethodSpec.packing_problem`; the data layer does not import adapters)."""
    if not cfg.data.get("packing", False):
        return []
    errors = []
    if adapter_conflict:
        errors.append(f"data.packing=true: {adapter_conflict}")
    if cfg.adapter.get("meta"):
        errors.append(
            "data.packing=true: adapter.meta (MeTA-LoRA) needs one task per row; set data.packing=false"
        )
    if cfg.alignment.get("name", "none") != "none":
        errors.append(
            f"data.packing=true: alignment={cfg.alignment.name} compares per-row task statistics; "
            "set data.packing=false or alignment=none"
        )
    pack_tokens = cfg.data.get("pack_tokens")
    if pack_tokens is not None:
        max_len = cfg.model.get("max_seq_len")
        ok = isinstance(pack_tokens, int) and not isinstance(pack_tokens, bool)
        if not ok or (isinstance(max_len, int) and pack_tokens < max_len):
            errors.append(
                f"data.pack_tokens={pack_tokens!r}: must be null (model.max_seq_len) or an integer >= "
                f"model.max_seq_len={max_len}, so every example fits a row"
            )
    return errors
