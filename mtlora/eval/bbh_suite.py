"""The ``bbh`` evaluation suite: one BBH protocol (``mtlora.eval.bbh``) over the selected tasks, generated
with :func:`mtlora.eval.generate.greedy_generate`, scored, aggregated and written.

Config (``eval.bbh``, presets in ``conf/eval/bbh/<protocol>.yaml``)::

    protocol        lmeval_cot_fewshot | lmeval_fewshot | mtlora_direct | align_lora | opencompass_cot
    tasks           null (all 27) or a list of task names
    limit           null or the first N evaluated examples per task
    max_new_tokens  null: the protocol's own value
    stop            null: the protocol's own stop strings; a list overrides them
    max_input_tokens  null: the protocol's own input truncation (2048 for mtlora_direct and align_lora,
                    none for the others); 0: never truncate; N: cut prompts to N tokens
    truncation_side null: the protocol's (left keeps the end of a prompt, right its start)
    batch_tokens    token budget per batch: longest prompt x rows <= batch_tokens
    max_batch_size  cap on rows per batch
    task_id         task id given to task-aware adapters (BBH tasks are unseen in training): null = error
                    when the adapter needs task ids; an int or a training-task name = that task's id for
                    every BBH prompt
    merge           fold mergeable adapters into the base weights while generating (unmerged after); task-aware
                    adapters are merged for ``task_id``
    data_dir        null: $MTLORA_DATA_DIR (the directory holding bbh/); ``hub``: the task examples from
                    lukaemon/bbh (prompt files of the four protocols that need them: still $MTLORA_DATA_DIR)

Outputs under ``out_dir`` (suite name ``bbh_<protocol>``): ``metrics/eval_bbh_<protocol>.json`` (per-task
accuracy, ``macro`` = unweighted mean over tasks as the papers report, ``micro`` = pooled over examples as
lm-eval reports, each labelled, plus the protocol settings), ``metrics/eval_bbh_<protocol>.csv`` and
``.md`` (per-task table with macro and micro rows), and ``predictions/bbh_<protocol>/<task>.jsonl``: one
line per example with ``id`` (``<task>/<index in the task file>``), ``prompt_sha1``, ``prompt`` (the text
given to the model, before any truncation to ``max_input_tokens``), ``generation`` (raw, cut at the first stop
string), ``extracted``, ``target`` and ``correct``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError
from mtlora.eval import bbh
from mtlora.eval.generate import greedy_generate, needs_task_ids
from mtlora.eval.outputs import write_suite_outputs

log = logging.getLogger(__name__)

DEFAULTS = {
    "protocol": "mtlora_direct",
    "tasks": None,
    "limit": None,
    "max_new_tokens": None,
    "stop": None,
    "max_input_tokens": None,
    "truncation_side": None,
    "batch_tokens": 16384,
    "max_batch_size": 64,
    "task_id": None,
    "merge": False,
    "data_dir": None,
}


def suite_name(protocol: str) -> str:
    return f"bbh_{protocol}"


def resolve_settings(bbh_cfg: DictConfig | dict | None) -> dict:
    """``eval.bbh`` with defaults filled in and the protocol's decode settings where null."""
    given = (
        OmegaConf.to_container(bbh_cfg, resolve=True) if OmegaConf.is_config(bbh_cfg) else dict(bbh_cfg or {})
    )
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"eval.bbh: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **given}
    p = bbh.get_protocol(s["protocol"])
    tasks = list(bbh.TASKS) if s["tasks"] is None else list(s["tasks"])
    for t in tasks:
        bbh.answer_type(t)  # ConfigError naming the 27 tasks
    s["tasks"] = tasks
    if s["max_new_tokens"] is None:
        s["max_new_tokens"] = p.decode.max_new_tokens
    s["stop"] = list(p.decode.stop) if s["stop"] is None else list(s["stop"])
    if s["max_input_tokens"] is None:
        s["max_input_tokens"] = p.decode.max_input_tokens
    elif s["max_input_tokens"] == 0:
        s["max_input_tokens"] = None  # 0: never truncate, whatever the protocol does
    if s["truncation_side"] is None:
        s["truncation_side"] = p.decode.truncation_side
    if s["truncation_side"] not in ("left", "right"):
        raise ConfigError(
            f"eval.bbh.truncation_side={s['truncation_side']!r}: allowed values are left, right"
        )
    return s


def resolve_task_id(model: torch.nn.Module, task_id, task_names: Sequence[str] | None) -> int | None:
    """The documented task-id policy for unseen BBH tasks (see the module doc)."""
    if not needs_task_ids(model):
        return None
    if task_id is None:
        raise ConfigError(
            "eval.bbh.task_id=null: the adapter is task-aware and BBH tasks were not trained on; set "
            f"eval.bbh.task_id to a training task id or name (training tasks: {list(task_names or [])})"
        )
    if isinstance(task_id, bool):
        raise ConfigError(f"eval.bbh.task_id={task_id!r}: must be an int or a training task name")
    if isinstance(task_id, str):
        if not task_names or task_id not in task_names:
            raise ConfigError(
                f"eval.bbh.task_id={task_id!r}: not a training task; choose from {list(task_names or [])}"
            )
        return list(task_names).index(task_id)
    n = len(task_names) if task_names else None
    if not isinstance(task_id, int) or task_id < 0 or (n is not None and task_id >= n):
        raise ConfigError(
            f"eval.bbh.task_id={task_id!r}: must be a task id in [0, {n}) or a training task name"
        )
    return task_id


def run_bbh(
    model: torch.nn.Module,
    tokenizer,
    bbh_cfg: DictConfig | dict | None,
    out_dir: Path,
    task_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Generate, score and write one BBH protocol; returns the metrics dict written to the JSON file."""
    s = resolve_settings(bbh_cfg)
    p = bbh.get_protocol(s["protocol"])
    data_dir = s["data_dir"]
    if data_dir != bbh.HUB or p.prompt.demos != "task_file":
        bbh.bbh_dir(data_dir)  # a missing data dir fails before any generation, naming path / env / hub id
    task_id = resolve_task_id(model, s["task_id"], task_names)
    items: list[dict] = []
    for task in s["tasks"]:
        _, examples = bbh.load_task(task, data_dir, p)
        offset = bbh.N_SHOTS if p.prompt.demos == "task_file" else 0
        n = len(examples) if s["limit"] is None else min(len(examples), int(s["limit"]))
        for i, ex in enumerate(examples[:n]):
            prompt = bbh.build_prompt(p, task, ex["input"], data_dir)
            items.append({"task": task, "index": offset + i, "prompt": prompt, "target": ex["target"]})

    gen_stats: dict = {}
    merged = False
    if s["merge"]:
        from mtlora.adapters import merge_adapters

        merge_adapters(model, task_id=task_id)  # task-aware adapters: merged for the eval task id
        merged = True
    try:
        gens = greedy_generate(
            model,
            tokenizer,
            [it["prompt"] for it in items],
            int(s["max_new_tokens"]),
            stop=tuple(s["stop"]),
            batch_tokens=int(s["batch_tokens"]),
            task_ids=task_id,
            progress=progress,
            max_batch_size=s["max_batch_size"],
            desc=f"bbh {p.name}",
            max_input_tokens=s["max_input_tokens"],
            truncation_side=s["truncation_side"],
            stats=gen_stats,
        )
    finally:
        if merged:
            from mtlora.adapters import unmerge_adapters

            unmerge_adapters(model)

    if gen_stats.get("truncated"):
        log.warning(
            "BBH %s: %d prompt(s) longer than %s tokens were cut (%s side)",
            p.name, gen_stats["truncated"], s["max_input_tokens"], s["truncation_side"],
        )  # fmt: skip
    per_task: dict[str, list[bool]] = {t: [] for t in s["tasks"]}
    preds: dict[str, list[dict]] = {t: [] for t in s["tasks"]}
    for it, gen in zip(items, gens):
        correct = bbh.score(p, it["task"], gen, it["target"])
        per_task[it["task"]].append(correct)
        preds[it["task"]].append(
            {
                "id": f"{it['task']}/{it['index']}",
                "prompt_sha1": hashlib.sha1(it["prompt"].encode()).hexdigest(),
                "prompt": it["prompt"],
                "generation": gen,
                "extracted": bbh.extract(p, it["task"], gen),
                "target": it["target"],
                "correct": bool(correct),
            }
        )
    result = {
        "suite": "bbh",
        "protocol": p.name,
        "source": p.source,
        "matching": p.matching,
        "source_aggregate": p.aggregate,
        "settings": {
            k: s[k]
            for k in (
                "limit",
                "max_new_tokens",
                "stop",
                "max_input_tokens",
                "truncation_side",
                "batch_tokens",
                "task_id",
                "merge",
            )
        },
        "truncated_prompts": gen_stats.get("truncated", 0),
        "data_dir": f"hub:{bbh.HUB_ID}" if data_dir == bbh.HUB else str(bbh.bbh_dir(data_dir)),
        **bbh.aggregate(per_task),
    }
    write_bbh_outputs(result, preds, Path(out_dir))
    return result


def write_bbh_outputs(result: dict, preds: dict[str, list[dict]], out_dir: Path) -> None:
    note = (
        f"BBH, protocol `{result['protocol']}` ({result['source']}). macro = {result['macro']['label']}; "
        f"micro = {result['micro']['label']}."
    )
    write_suite_outputs(
        suite_name(result["protocol"]), result, ["task", "n", "correct", "accuracy"], note, preds, out_dir
    )


def summary_line(result: dict) -> str:
    return (
        f"BBH {result['protocol']}: macro {result['macro']['accuracy']:.4f} over {result['macro']['n_tasks']} "
        f"tasks, micro {result['micro']['accuracy']:.4f} over {result['micro']['n']} examples"
    )
