"""The ``heldin_gen`` evaluation suite: each training task's held-out rows, answered by greedy generation and
scored with the task's own metric (:mod:`mtlora.eval.scoring`).

Prompts are the held-out rows' ``prompt`` text exactly as training rendered it (same template; tokenized with
the tokenizer's default special tokens, which is the prefix training puts in front of a prompt). Rows are
generated together across tasks with :func:`mtlora.eval.generate.greedy_generate`, each row with its own
task's id (task-aware adapters: mtl_lora, moelora, ...). Generation stops at EOS (training appends EOS to
every target), after ``max_new_tokens``, or at a ``stop`` string. Over-long prompts are cut to
``max_input_tokens`` when set (Align-LoRA's held-in setting: 512), keeping their end (``truncation_side``).

Metric per task: ``data.tasks.<task>.eval.metric`` (``exact | option | number | rouge_l``; ``exact`` when
missing). The per-task ``score`` is the accuracy for exact/option/number and the mean ROUGE-L F1 for
``rouge_l``; ``accuracy`` is the share of ``correct`` rows for every task (for ``rouge_l`` rows: exact match).

Config (``eval.heldin_gen``, ``conf/eval/heldin_gen.yaml``): ``limit`` (first N held-out rows per task; null:
all, already capped by the task's ``eval.max_examples``), ``max_new_tokens``, ``stop`` (list of strings), ``max_input_tokens`` (null: no
truncation), ``truncation_side`` (``left``: keep a prompt's end; ``right``: its start), ``batch_tokens``,
``max_batch_size``.

Outputs under ``out_dir``: ``metrics/eval_heldin_gen.json`` (per task: metric, n, correct, accuracy, score;
``macro`` = unweighted mean over tasks, ``micro`` = pooled over rows, each labelled),
``metrics/eval_heldin_gen.csv`` / ``.md`` (per-task table plus macro and micro rows) and
``predictions/heldin_gen/<task>.jsonl``: ``id`` (``<task>/<held-out row>``), ``prompt_sha1``, ``prompt``, ``task_id``,
``generation`` (raw), ``extracted``, ``target``, ``correct``, ``score``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mtlora.errors import ConfigError
from mtlora.eval import scoring
from mtlora.eval.outputs import write_suite_outputs
from mtlora.eval.settings import resolve_settings
from mtlora.eval.suites import GENERATION, Suite, SuiteContext, register

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SUITE = "heldin_gen"
DEFAULTS = {
    "limit": None,
    "max_new_tokens": 128,
    "stop": [],
    "max_input_tokens": None,
    "truncation_side": "left",
    "batch_tokens": 16384,
    "max_batch_size": 64,
}
MACRO_LABEL = "unweighted mean over tasks of the per-task score / accuracy"
MICRO_LABEL = "pooled over all rows (score: accuracy or ROUGE-L F1 per row)"


def run_heldin_gen(
    model: torch.nn.Module,
    tokenizer,
    data,
    data_cfg: DictConfig,
    hg_cfg: DictConfig | dict | None,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Generate, score and write the held-in generation suite for ``data`` (a ``MultiTaskData``)."""
    s = resolve_settings(hg_cfg, DEFAULTS, "eval.heldin_gen")
    names = list(data.task_names)
    metric_of = scoring.task_metrics(data_cfg, names)
    items: list[dict] = []
    for t, (name, ds) in enumerate(zip(names, data.eval)):
        n = len(ds) if s["limit"] is None else min(len(ds), int(s["limit"]))
        if n == 0:
            raise ConfigError(f"heldin_gen: training task {name!r} has no held-out rows")
        for i in range(n):
            row = ds[i]
            items.append(
                {"task": name, "task_id": t, "index": i, "prompt": row["prompt"], "target": row["target"]}
            )
    from mtlora.eval import generate

    gens = generate.greedy_generate(
        model,
        tokenizer,
        [it["prompt"] for it in items],
        int(s["max_new_tokens"]),
        stop=tuple(s["stop"] or ()),
        batch_tokens=int(s["batch_tokens"]),
        task_ids=[it["task_id"] for it in items],
        progress=progress,
        max_batch_size=s["max_batch_size"],
        desc=SUITE,
        max_input_tokens=s["max_input_tokens"],
        truncation_side=s["truncation_side"],
    )
    scores: dict[str, list[tuple[bool, float]]] = {n: [] for n in names}
    preds: dict[str, list[dict]] = {n: [] for n in names}
    for it, gen in zip(items, gens):
        m = metric_of[it["task"]]
        ok, value = scoring.score(m, gen, it["target"])
        scores[it["task"]].append((ok, value))
        preds[it["task"]].append(
            {
                "id": f"{it['task']}/{it['index']}",
                "prompt_sha1": hashlib.sha1(it["prompt"].encode()).hexdigest(),
                "prompt": it["prompt"],
                "task_id": it["task_id"],
                "generation": gen,
                "extracted": scoring.extract(m, gen),
                "target": it["target"],
                "correct": bool(ok),
                "score": value,
            }
        )
    result = {
        "suite": SUITE,
        "settings": {k: s[k] for k in DEFAULTS},
        **scoring.summarize({n: {"metric": metric_of[n]} for n in names}, scores, MACRO_LABEL, MICRO_LABEL),
    }
    note = (
        "Held-in tasks, greedy generation; score = accuracy (exact / option / number) or mean ROUGE-L F1 "
        f"(rouge_l); accuracy = share correct. macro = {MACRO_LABEL}; micro = {MICRO_LABEL}."
    )
    cols = ["task", "metric", "n", "correct", "accuracy", "score"]
    write_suite_outputs(SUITE, result, cols, note, preds, out_dir)
    return result


def summary_line(result: dict) -> str:
    return (
        f"held-in generation: macro score {result['macro']['score']:.4f} (accuracy "
        f"{result['macro']['accuracy']:.4f}) over {result['macro']['n_tasks']} tasks, micro score "
        f"{result['micro']['score']:.4f} over {result['micro']['n']} rows"
    )


def _run(ctx: SuiteContext) -> dict:
    data = ctx.held_out()
    r = run_heldin_gen(ctx.model, ctx.tokenizer, data, ctx.run_cfg.data, ctx.eval_cfg.get(SUITE), ctx.out_dir)
    ctx.report(
        SUITE, summary_line(r), {f"{SUITE}/macro": r["macro"]["score"], f"{SUITE}/micro": r["micro"]["score"]}
    )
    return r


EVAL_SUITE = register(Suite(SUITE, GENERATION, _run, needs=frozenset({"data", "tokenizer"})))
