"""The ``bbh`` evaluation suite: one BBH protocol (``mtlora.eval.bbh``) over the selected tasks, generated
with :func:`mtlora.eval.generate.greedy_generate`, scored, aggregated and written.

Config (``eval.bbh``, presets in ``conf/eval/bbh/<protocol>.yaml``)::

    protocol        lmeval_cot_fewshot | lmeval_fewshot | mtlora_direct | align_lora | opencompass_cot
    tasks           null (all 27) or a list of task names
    limit           null or the first N evaluated examples per task
    max_new_tokens  null: the protocol's own value
    stop            null: the protocol's own stop strings; a list overrides them
    max_input_tokens  null: the protocol's own input truncation (2048 for mtlora_direct and align_lora,
                    ``model`` for the lm-eval presets, none for opencompass_cot); 0: never truncate; N: cut
                    prompts to N tokens; ``model``: to ``model_max_length - max_new_tokens`` tokens, refused
                    (ConfigError) when that is <= 0, as lm-eval does
    model_max_length  the context length ``model`` truncation uses; null: looked up as lm-eval does
                    (:func:`mtlora.eval.generate.model_max_length`: model config, tokenizer, 2048); N: N
                    (lm-eval's ``max_length`` model argument)
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
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError
from mtlora.eval import bbh
from mtlora.eval.outputs import write_suite_outputs
from mtlora.eval.settings import resolve_task_id
from mtlora.eval.suites import GENERATION, Suite, SuiteContext, register

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULTS = {
    "protocol": "mtlora_direct",
    "tasks": None,
    "limit": None,
    "max_new_tokens": None,
    "stop": None,
    "max_input_tokens": None,
    "model_max_length": None,
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
    m = s["max_input_tokens"]
    if m is not None and m != bbh.MODEL_LENGTH and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
        raise ConfigError(
            f"eval.bbh.max_input_tokens={m!r}: allowed values are null, 0 (never cut), an int N >= 1 or "
            f"{bbh.MODEL_LENGTH!r} (model_max_length - max_new_tokens)"
        )
    n = s["model_max_length"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"eval.bbh.model_max_length={n!r}: allowed values are null or an int >= 1")
    if m is None:
        s["max_input_tokens"] = p.decode.max_input_tokens
    elif m == 0:
        s["max_input_tokens"] = None  # 0: never truncate, whatever the protocol does
    if s["truncation_side"] is None:
        s["truncation_side"] = p.decode.truncation_side
    if s["truncation_side"] not in ("left", "right"):
        raise ConfigError(
            f"eval.bbh.truncation_side={s['truncation_side']!r}: allowed values are left, right"
        )
    return s


def input_limit(settings: dict, max_length: int | None) -> int | None:
    """The prompt length (tokens) that ``settings`` cut prompts to; None: never cut.

    ``max_input_tokens == "model"``: ``max_length - max_new_tokens`` (lm-eval's HFLM.generate_until,
    ``max_ctx_len = max_length - max_gen_toks``), where ``max_length`` is ``eval.bbh.model_max_length`` when
    set, else the given model length. Raises :class:`ConfigError` when that leaves no room for the prompt."""
    m = settings["max_input_tokens"]
    if m != bbh.MODEL_LENGTH:
        return m
    n = settings.get("model_max_length") or max_length
    if n is None:
        raise ConfigError(
            "eval.bbh.max_input_tokens=model needs the model's context length: set eval.bbh.model_max_length"
        )
    room = int(n) - int(settings["max_new_tokens"])
    if room <= 0:
        raise ConfigError(
            f"eval.bbh: model max length {n} (eval.bbh.model_max_length, else the model config) minus "
            f"eval.bbh.max_new_tokens={settings['max_new_tokens']} leaves {room} prompt tokens (lm-eval refuses "
            "this too): lower eval.bbh.max_new_tokens, raise eval.bbh.model_max_length, or set "
            "eval.bbh.max_input_tokens=0 (never cut)"
        )
    return room


def check_room(bbh_cfg: DictConfig | dict | None, model_cfg: DictConfig | None) -> None:
    """Refuse up front (ConfigError, :func:`input_limit`) a ``model`` truncation that leaves no room for the
    prompt, when the context length is known before the model is built: ``eval.bbh.model_max_length``, or the
    architecture of a ``model.init=random`` preset. Other cases are checked by :func:`run_bbh`."""
    s = resolve_settings(bbh_cfg)
    if s["max_input_tokens"] != bbh.MODEL_LENGTH:
        return
    length = s["model_max_length"]
    if length is None and model_cfg is not None and model_cfg.get("init") == "random":
        from mtlora.eval.generate import MODEL_LENGTH_ATTRS, model_max_length
        from mtlora.models.factory import arch_config

        config = arch_config(model_cfg)
        cfg = getattr(config, "text_config", None) or config
        if any(getattr(cfg, a, None) is not None for a in MODEL_LENGTH_ATTRS):
            length = model_max_length(config)
    if length is not None:
        input_limit(s, length)


def run_bbh(
    model: torch.nn.Module,
    tokenizer,
    bbh_cfg: DictConfig | dict | None,
    out_dir: Path,
    task_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Generate, score and write one BBH protocol; returns the metrics dict written to the JSON file."""
    from mtlora.eval import generate

    s = resolve_settings(bbh_cfg)
    p = bbh.get_protocol(s["protocol"])
    length = None
    if s["max_input_tokens"] == bbh.MODEL_LENGTH:
        length = s["model_max_length"] or generate.model_max_length(getattr(model, "config", None), tokenizer)
    max_input = input_limit(s, length)  # refused here, before any generation
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
        gens = generate.greedy_generate(
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
            max_input_tokens=max_input,
            truncation_side=s["truncation_side"],
            truncate_special_tokens=p.decode.truncate_special_tokens,
            stats=gen_stats,
        )
    finally:
        if merged:
            from mtlora.adapters import unmerge_adapters

            unmerge_adapters(model)

    if gen_stats.get("truncated"):
        log.warning(
            "BBH %s: %d prompt(s) longer than %s tokens were cut (%s side)",
            p.name, gen_stats["truncated"], max_input, s["truncation_side"],
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
            **{
                k: s[k]
                for k in (
                    "limit",
                    "max_new_tokens",
                    "stop",
                    "truncation_side",
                    "batch_tokens",
                    "task_id",
                    "merge",
                )
            },
            "max_input_tokens": max_input,
            "model_max_length": length,
            "truncate_special_tokens": p.decode.truncate_special_tokens,
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


def _outputs(eval_cfg: DictConfig | None) -> list[str]:
    return [suite_name(resolve_settings(eval_cfg.get("bbh") if eval_cfg is not None else None)["protocol"])]


def _run(ctx: SuiteContext) -> dict:
    r = run_bbh(ctx.model, ctx.tokenizer, ctx.eval_cfg.bbh, ctx.out_dir, task_names=ctx.training_tasks())
    key = suite_name(r["protocol"])
    ctx.report(
        key, summary_line(r), {f"{key}/macro": r["macro"]["accuracy"], f"{key}/micro": r["micro"]["accuracy"]}
    )
    return r


EVAL_SUITE = register(
    Suite("bbh", GENERATION, _run, needs=frozenset({"tokenizer", "task_names"}), outputs=_outputs)
)
