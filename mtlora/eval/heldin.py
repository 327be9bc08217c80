"""Held-out evaluation of every training task, teacher-forced.

Per task: mean cross-entropy per answer token (``loss``), share of answer tokens predicted by argmax
(``token_acc``), and ``exact_match``: every answer token (including the EOS) is the argmax given the gold
prefix. That holds exactly when greedy decoding from the prompt reproduces the answer and stops, so it
equals greedy-generation exact match at the cost of one forward pass. ``macro`` averages over tasks (what
papers report), ``micro`` pools all examples.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mtlora.eval.outputs import write_heldin
from mtlora.eval.suites import TEACHER_FORCED, Suite, SuiteContext, register

if TYPE_CHECKING:
    import torch

    from mtlora.data.build import MultiTaskData

log = logging.getLogger(__name__)

METRICS = ("loss", "token_acc", "exact_match")


def evaluate_heldin(
    model: torch.nn.Module,
    data: MultiTaskData,
    batch_size: int,
    max_per_task: int | None,
    device: torch.device,
) -> dict:
    """Per-task ``loss``, ``token_acc`` and ``exact_match`` on the held-out rows (see the module doc)."""
    import torch

    with torch.no_grad():
        return _evaluate_heldin(model, data, batch_size, max_per_task, device)


def _evaluate_heldin(model, data, batch_size: int, max_per_task: int | None, device) -> dict:
    from mtlora.data.collate import collate

    # the per-token LM cross entropy that training minimises
    from mtlora.losses.causal_lm import token_cross_entropy

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


def _run(ctx: SuiteContext) -> dict:
    """The ``heldin`` suite of ``mtlora.evaluate``: ``metrics/eval_heldin.{json,md}``."""
    import torch

    model = ctx.model
    if getattr(model, "adapter_context", None) is None:
        from mtlora.adapters import AdapterContext

        object.__setattr__(model, "adapter_context", AdapterContext())  # task ids are set on it per batch
    device = ctx.device if ctx.device is not None else next(model.parameters(), torch.empty(0)).device
    e = ctx.eval_cfg
    r = evaluate_heldin(model, ctx.held_out(), int(e.batch_size), e.get("max_examples_per_task"), device)
    result = {"suite": "heldin", **r}
    write_heldin(result, ctx.out_dir)
    log.info("held-out eval: macro exact match %.4f", r["macro"]["exact_match"])
    return result


EVAL_SUITE = register(
    Suite(
        "heldin",
        TEACHER_FORCED,
        _run,
        needs=frozenset({"data", "tokenizer"}),
        tables=("json", "md"),
        predictions=False,
    )
)
