"""A few greedy generations per held-in task at the end of every run, to look at (``eval.samples``).

For each training task, the first ``per_task`` held-out rows are answered by greedy decoding
(:func:`mtlora.eval.generate.greedy_generate`: the training prompt, the row's task id, at most
``max_new_tokens``, stop at EOS) and read with the task's metric (:mod:`mtlora.eval.scoring`,
``data.tasks.<task>.eval.metric``). Written to ``predictions/heldin_samples/<task>.jsonl``, one line per row:
``id`` (``<task>/<held-out row>``), ``task``, ``prompt``, ``target``, ``generation``, ``extracted`` (the answer
the metric reads), ``correct`` and ``score`` (ROUGE-L F1 for ``rouge_l`` tasks, else 0/1). Nothing is
aggregated: the ``heldin_gen`` suite scores generation over all held-out rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mtlora.eval import scoring
from mtlora.eval.outputs import write_predictions
from mtlora.eval.settings import resolve_settings
from mtlora.eval.suites import GENERATION, Suite, SuiteContext, register
from mtlora.run.layout import RunLayout

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NAME = "heldin_samples"
DEFAULTS = {"per_task": 3, "max_new_tokens": 64}


def write_heldin_samples(
    model: torch.nn.Module,
    tokenizer,
    data,
    data_cfg: DictConfig,
    samples_cfg: DictConfig | dict | None,
    out_dir: Path,
) -> dict[str, list[dict]]:
    """Generate and write the samples of every task of ``data`` (a ``MultiTaskData``); returns them by task
    (empty when ``per_task`` is 0)."""
    s = resolve_settings(samples_cfg, DEFAULTS, "eval.samples")
    per_task = int(s["per_task"] or 0)
    if per_task <= 0:
        return {}
    names = list(data.task_names)
    metric_of = scoring.task_metrics(data_cfg, names)
    items = [
        {"task": name, "task_id": t, "index": i, "prompt": ds[i]["prompt"], "target": ds[i]["target"]}
        for t, (name, ds) in enumerate(zip(names, data.eval))
        for i in range(min(per_task, len(ds)))
    ]
    if not items:
        return {}
    from mtlora.eval import generate

    gens = generate.greedy_generate(
        model,
        tokenizer,
        [it["prompt"] for it in items],
        int(s["max_new_tokens"]),
        task_ids=[it["task_id"] for it in items],
        progress=False,
    )
    preds: dict[str, list[dict]] = {}
    for it, gen in zip(items, gens):
        m = metric_of[it["task"]]
        ok, value = scoring.score(m, gen, it["target"])
        preds.setdefault(it["task"], []).append(
            {
                "id": f"{it['task']}/{it['index']}",
                "task": it["task"],
                "prompt": it["prompt"],
                "target": it["target"],
                "generation": gen,
                "extracted": scoring.extract(m, gen),
                "correct": bool(ok),
                "score": value,
            }
        )
    write_predictions(NAME, preds, out_dir)
    n_ok = sum(p["correct"] for rows in preds.values() for p in rows)
    log.info(
        "held-in samples: %d of %d greedy generations correct, in %s",
        n_ok,
        len(items),
        RunLayout(out_dir).suite_predictions(NAME),
    )
    return preds


def _run(ctx: SuiteContext) -> None:
    data = ctx.held_out()
    write_heldin_samples(
        ctx.model, ctx.tokenizer, data, ctx.run_cfg.data, ctx.eval_cfg.get("samples"), ctx.out_dir
    )


#: not listed in ``eval.suites``: a run ends with it unless ``eval.samples`` is null (``per_task: 0``: none)
EVAL_SUITE = register(
    Suite(NAME, GENERATION, _run, needs=frozenset({"data", "tokenizer"}), tables=(), switch="samples")
)
