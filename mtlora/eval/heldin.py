"""Held-out evaluation of every training task, teacher-forced.

Per task: mean cross-entropy per answer token (``loss``), share of answer tokens predicted by argmax
(``token_acc``), and ``exact_match``: every answer token (including the EOS) is the argmax given the gold
prefix. That holds exactly when greedy decoding from the prompt reproduces the answer and stops, so it
equals greedy-generation exact match at the cost of one forward pass. ``macro`` averages over tasks (what
papers report), ``micro`` pools all examples.
"""

from __future__ import annotations

import torch

from mtlora.data.build import MultiTaskData
from mtlora.data.collate import collate
from mtlora.losses.causal_lm import token_cross_entropy

METRICS = ("loss", "token_acc", "exact_match")


@torch.no_grad()
def evaluate_heldin(
    model: torch.nn.Module,
    data: MultiTaskData,
    batch_size: int,
    max_per_task: int | None,
    device: torch.device,
) -> dict:
    ctx = model.adapter_context
    was_training = model.training
    model.eval()
    tasks: dict[str, dict] = {}
    pooled = {"n": 0, "loss_sum": 0.0, "tokens": 0, "correct": 0, "exact": 0}
    for t, (name, ds) in enumerate(zip(data.task_names, data.eval)):
        n = len(ds) if max_per_task is None else min(len(ds), max_per_task)
        acc = {"n": 0, "loss_sum": 0.0, "tokens": 0, "correct": 0, "exact": 0}
        for start in range(0, n, batch_size):
            rows = ds.select(range(start, min(n, start + batch_size)))
            batch = {k: v.to(device) for k, v in collate(list(rows), [t] * len(rows), data.pad_id).items()}
            ctx.begin(task_ids=batch["task_ids"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce, mask = token_cross_entropy(logits, batch["labels"])
            hit = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask
            acc["n"] += len(rows)
            acc["loss_sum"] += ce.sum().item()
            acc["tokens"] += int(mask.sum())
            acc["correct"] += int(hit.sum())
            acc["exact"] += int((hit | ~mask).all(dim=1).sum())
        for k in pooled:
            pooled[k] += acc[k]
        tasks[name] = _finish(acc)
    if was_training:
        model.train()
    macro = {m: sum(r[m] for r in tasks.values()) / max(len(tasks), 1) for m in METRICS}
    return {"tasks": tasks, "macro": macro, "micro": _finish(pooled)}


def _finish(acc: dict) -> dict:
    return {
        "n": acc["n"],
        "loss": acc["loss_sum"] / max(acc["tokens"], 1),
        "token_acc": acc["correct"] / max(acc["tokens"], 1),
        "exact_match": acc["exact"] / max(acc["n"], 1),
    }
