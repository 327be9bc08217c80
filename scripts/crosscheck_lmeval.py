"""Cross-check our BBH evaluation (``mtlora.eval.bbh_suite.run_bbh``) against the ``lm-eval`` package, per example.

Usage::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/crosscheck_lmeval.py --run-dir RUN \\
        [--tasks boolean_expressions,navigate] [--limit 5] [--protocol lmeval_fewshot|lmeval_cot_fewshot] \\
        --out DIR

Needs ``pip install 'mtlora[crosscheck]'`` (lm-eval). Runs fully offline. Steps:

1. **HF model dir** for the run (``DIR/hf_model``): the merged export (:func:`mtlora.export.export_merged`)
   for a mergeable adapter; for ``adapter.method=none`` the run's ``base_model/`` when it holds the weights
   and an EOS id (else the rebuilt base model is saved with the tokenizer's special ids,
   :func:`mtlora.export.set_special_token_ids`, so that lm-eval's ``generate`` stops at EOS). The tokenizer is the run's ``base_model/tokenizer`` (our byte
   tokenizer is saved as a ``PreTrainedTokenizerFast`` ``tokenizer.json``, which ``AutoTokenizer`` loads).
   ``--model-dir`` skips this and uses an HF model dir as is (``--tokenizer`` when it has no tokenizer).
2. **Local lm-eval task directory** (``DIR/lmeval_tasks``): one YAML per task that ``include``s the installed
   lm-eval's own ``lm_eval/tasks/bbh/{fewshot,cot_fewshot}/<task>.yaml`` (so prompt template, inlined
   exemplars, description, ``until`` stop strings, ``max_gen_toks``, filters and metric are lm-eval's) and only
   replaces the dataset: ``dataset_path: json`` with ``data_files`` = ``$MTLORA_DATA_DIR/bbh/<task>.json``,
   ``field: examples``. Nothing is vendored into the repo.
3. ``lm_eval.simple_evaluate(model="hf", ..., include_path=..., log_samples=True, limit=N)``, greedy. Both
   sides cut prompts to ``max_length - max_gen_toks`` ids: lm-eval reads ``max_length`` from the model config
   (``max_position_embeddings``, 512 for the tiny model) and our lm-eval presets read it the same way;
   ``--max-length N`` sets lm-eval's ``max_length`` model argument and our ``eval.bbh.model_max_length``
   alike. With the defaults ``bbh_cot_fewshot`` (1024 new tokens) is refused by both on a 512-position model.
4. Our ``run_bbh`` with the matching protocol on the same weights (``--ours-model hf``: the same HF dir; ``run``:
   :func:`mtlora.trained_run.load_run`, adapters unmerged).
5. Per example: prompt text identical, raw generation identical (both cut at the stop strings), extracted
   answer identical, correctness identical. Prints a per-task table, writes ``DIR/crosscheck_report.json``
   (counts + every disagreement with both sides' text).

Exit status 0 when every compared example agrees on all four, 1 otherwise (2 on usage errors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: our protocol -> lm-eval's BBH variant directory (lm_eval/tasks/bbh/<variant>/)
LMEVAL_VARIANTS = {"lmeval_fewshot": "fewshot", "lmeval_cot_fewshot": "cot_fewshot"}
TASK_PREFIX = "mtlora_xc"
FIELDS = ("prompt", "generation", "extracted", "correct")
DEFAULT_TASKS = ("boolean_expressions", "date_understanding", "navigate", "object_counting", "word_sorting")


# ------------------------------------------------------------------------------------------------------
# Comparison (no lm-eval needed)
# ------------------------------------------------------------------------------------------------------
def compare_records(ours: dict[str, dict], theirs: dict[str, dict], max_examples: int = 50) -> dict:
    """Compare per-example records keyed by id (``<task>/<index>``).

    Each record: ``prompt`` (text), ``generation`` (continuation cut at the stop strings), ``extracted``,
    ``correct`` (bool). Returns overall and per-task counts of identical fields, ids only on one side, and up
    to ``max_examples`` disagreements with both sides' values.
    """
    common = sorted(set(ours) & set(theirs), key=_id_key)
    per_task: dict[str, dict] = {}
    totals = {"compared": 0, **{f"same_{f}": 0 for f in FIELDS}, "all_same": 0}
    disagreements = []
    for i in common:
        a, b = ours[i], theirs[i]
        task = i.rsplit("/", 1)[0]
        t = per_task.setdefault(task, {"compared": 0, **{f"same_{f}": 0 for f in FIELDS}, "all_same": 0})
        same = {f: _norm(f, a.get(f)) == _norm(f, b.get(f)) for f in FIELDS}
        for d in (t, totals):
            d["compared"] += 1
            for f in FIELDS:
                d[f"same_{f}"] += int(same[f])
            d["all_same"] += int(all(same.values()))
        if not all(same.values()) and len(disagreements) < max_examples:
            diff = {"id": i, "differs": [f for f in FIELDS if not same[f]]}
            for f in FIELDS:
                if not same[f]:
                    diff[f] = {"ours": a.get(f), "lmeval": b.get(f)}
                    if f == "prompt":
                        diff[f] = _first_difference(a.get(f) or "", b.get(f) or "")
            disagreements.append(diff)
    acc = {
        side: {
            task: sum(bool(recs[i]["correct"]) for i in common if i.rsplit("/", 1)[0] == task)
            for task in per_task
        }
        for side, recs in (("ours", ours), ("lmeval", theirs))
    }
    for task, t in per_task.items():
        t["correct_ours"] = acc["ours"][task]
        t["correct_lmeval"] = acc["lmeval"][task]
    totals["correct_ours"] = sum(acc["ours"].values())
    totals["correct_lmeval"] = sum(acc["lmeval"].values())
    return {
        "totals": totals,
        "tasks": per_task,
        "only_ours": sorted(set(ours) - set(theirs), key=_id_key),
        "only_lmeval": sorted(set(theirs) - set(ours), key=_id_key),
        "agree": bool(common) and totals["all_same"] == totals["compared"] and set(ours) == set(theirs),
        "disagreements": disagreements,
        "n_disagreements": totals["compared"] - totals["all_same"],
    }


def _id_key(i: str):
    task, _, idx = i.rpartition("/")
    return (task, int(idx) if idx.isdigit() else idx)


def _norm(field: str, v):
    return bool(v) if field == "correct" else v


def _first_difference(a: str, b: str, context: int = 60) -> dict:
    """Where two prompts first differ, with a little context on both sides (repr'd)."""
    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {
        "first_diff_at": n,
        "len_ours": len(a),
        "len_lmeval": len(b),
        "ours": repr(a[max(0, n - context) : n + context]),
        "lmeval": repr(b[max(0, n - context) : n + context]),
    }


def format_table(report: dict) -> str:
    """A markdown agreement table: per task and total."""
    cols = ["task", "compared", *[f"same_{f}" for f in FIELDS], "all_same", "correct_ours", "correct_lmeval"]
    rows = [{"task": t, **v} for t, v in report["tasks"].items()]
    rows.append({"task": "**total**", **report["totals"]})
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def records_from_lmeval_samples(samples: Iterable[dict], task: str) -> dict[str, dict]:
    """Our record form of lm-eval's logged samples of one task (``log_samples=True``)."""
    out = {}
    for s in samples:
        args = s["arguments"][0]
        prompt = args[0] if isinstance(args, list | tuple) else args.get("arg_0")
        gen = s["resps"][0][0] if isinstance(s["resps"][0], list | tuple) else s["resps"][0]
        ext = s["filtered_resps"][0]
        if isinstance(ext, list | tuple):
            ext = ext[0]
        out[f"{task}/{int(s['doc_id'])}"] = {
            "prompt": prompt,
            "generation": gen,
            "extracted": ext,
            "target": s.get("target"),
            "correct": bool(s.get("exact_match")),
        }
    return out


def records_from_ours(pred_dir: Path, tasks: list[str], prompts: dict[str, str]) -> dict[str, dict]:
    """Our predictions jsonl (``predictions/bbh_<protocol>/<task>.jsonl``) with the prompt text added (the
    jsonl holds only ``prompt_sha1``; the text is rebuilt with :func:`mtlora.eval.bbh.build_prompt` and must
    hash to it)."""
    out = {}
    for task in tasks:
        for line in (pred_dir / f"{task}.jsonl").read_text().splitlines():
            r = json.loads(line)
            prompt = prompts[r["id"]]
            if hashlib.sha1(prompt.encode()).hexdigest() != r["prompt_sha1"]:
                raise RuntimeError(f"{r['id']}: rebuilt prompt does not hash to the written prompt_sha1")
            out[r["id"]] = {**r, "prompt": prompt}
    return out


# ------------------------------------------------------------------------------------------------------
# Model dir and lm-eval task dir
# ------------------------------------------------------------------------------------------------------
def hf_model_dir(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) of a run as a plain Hugging Face model (see the module doc)."""
    from mtlora.run.rundir import load_resolved_config

    cfg = load_resolved_config(run_dir)
    method = str(cfg.adapter.get("method", "none"))
    tok_dir = run_dir / "base_model" / "tokenizer"
    if method == "none":
        base = run_dir / "base_model"
        if (base / "model.safetensors").exists() and _has_eos_id(base / "config.json"):
            return base, tok_dir
        from transformers import AutoTokenizer

        from mtlora.export import set_special_token_ids
        from mtlora.trained_run import load_base_model

        dest = out / "hf_model"
        model = load_base_model(run_dir, cfg)
        set_special_token_ids(model, AutoTokenizer.from_pretrained(str(tok_dir)))
        model.save_pretrained(str(dest))
        return dest, tok_dir
    from mtlora.export import export_merged

    dest = out / "hf_model"
    export_merged(run_dir, dest, overwrite=True)
    return dest, dest


def _has_eos_id(config_json: Path) -> bool:
    return config_json.is_file() and json.loads(config_json.read_text()).get("eos_token_id") is not None


def lmeval_bbh_dir(variant: str) -> Path:
    import lm_eval

    d = Path(lm_eval.__file__).parent / "tasks" / "bbh" / variant
    if not d.is_dir():
        raise FileNotFoundError(f"installed lm-eval has no {d}")
    return d


def write_task_dir(out: Path, tasks: list[str], protocol: str, data_dir: Path) -> dict[str, str]:
    """One YAML per task including lm-eval's own BBH task YAML, with the dataset swapped for our local json.
    Returns ``{our task name: lm-eval task name}``."""
    variant = LMEVAL_VARIANTS[protocol]
    src = lmeval_bbh_dir(variant)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        inc = src / f"{task}.yaml"
        data = data_dir / f"{task}.json"
        if not inc.is_file():
            raise FileNotFoundError(f"lm-eval has no BBH task file {inc}")
        if not data.is_file():
            raise FileNotFoundError(f"BBH data file {data} does not exist")
        name = f"{TASK_PREFIX}_{variant}_{task}"
        cfg = {
            "include": str(inc),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}, "field": "examples"},
            "test_split": "test",
        }
        # JSON is valid YAML: no yaml dependency, exact strings
        (out / f"{name}.yaml").write_text(json.dumps(cfg, indent=2) + "\n")
        names[task] = name
    return names


def run_lmeval(model_dir: Path, tok_dir: Path, task_dir: Path, names: dict[str, str], args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={model_dir},tokenizer={tok_dir},dtype={args.dtype},device={args.device}"
    if args.max_length is not None:
        model_args += f",max_length={args.max_length}"
    tm = TaskManager(include_path=str(task_dir))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(names.values()),
        task_manager=tm,
        log_samples=True,
        limit=args.limit,
        batch_size=args.lmeval_batch_size,
        num_fewshot=None,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {"results": res, "seconds": time.perf_counter() - t0, "model_args": model_args}


def lmeval_prompts(task_dir: Path, names: dict[str, str], limit: int | None) -> dict[str, dict]:
    """lm-eval's own request for every example, without a model: ``{id: {prompt, until, max_gen_toks}}``."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(task_dir))
    tasks = get_task_dict(list(names.values()), tm)
    by_name = {v: k for k, v in names.items()}
    out = {}
    for name, task in tasks.items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            ctx, kw = inst.args[0], inst.args[1]
            out[f"{by_name[name]}/{int(inst.doc_id)}"] = {
                "prompt": ctx,
                "until": list(kw.get("until", [])),
                "max_gen_toks": kw.get("max_gen_toks"),
            }
    return out


def prompt_check(ours: dict[str, str], theirs: dict[str, dict], protocol: str, max_per_task: int = 3) -> dict:
    """Prompt text and decode settings (stop strings, max new tokens; lm-eval's HF default 256 where the task
    sets none) of our protocol vs lm-eval's requests, per example and per task."""
    from mtlora.eval import bbh

    p = bbh.get_protocol(protocol)
    per_task: dict[str, dict] = {}
    diffs = []
    for i in sorted(set(ours) & set(theirs), key=_id_key):
        task = i.rsplit("/", 1)[0]
        t = per_task.setdefault(task, {"compared": 0, "same_prompt": 0})
        t["compared"] += 1
        same = ours[i] == theirs[i]["prompt"]
        t["same_prompt"] += int(same)
        if not same and sum(d["id"].startswith(task + "/") for d in diffs) < max_per_task:
            diffs.append({"id": i, "prompt": _first_difference(ours[i], theirs[i]["prompt"])})
    settings = {
        (tuple(v["until"]), v["max_gen_toks"] if v["max_gen_toks"] is not None else 256)
        for v in theirs.values()
    }
    ours_settings = (tuple(p.decode.stop), p.decode.max_new_tokens)
    return {
        "compared": sum(t["compared"] for t in per_task.values()),
        "same_prompt": sum(t["same_prompt"] for t in per_task.values()),
        "tasks": per_task,
        "only_ours": sorted(set(ours) - set(theirs), key=_id_key),
        "only_lmeval": sorted(set(theirs) - set(ours), key=_id_key),
        "lmeval_decode": sorted([list(u), m] for u, m in settings),
        "ours_decode": [list(ours_settings[0]), ours_settings[1]],
        "same_decode": settings == {ours_settings},
        "disagreements": diffs,
    }


def run_ours(model_dir: Path, tok_dir: Path, tasks: list[str], args, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtlora.eval.bbh_suite import run_bbh

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.ours_model == "run":
        from mtlora.trained_run import load_run

        model, tok = load_run(args.run_dir, device=args.device)
        model = model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device).eval()
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
    cfg = {
        "protocol": args.protocol,
        "tasks": tasks,
        "limit": args.limit,
        "data_dir": str(args.data_root),
        "batch_tokens": args.batch_tokens,
        "model_max_length": args.max_length,  # None: read from the model config, as lm-eval does
    }
    t0 = time.perf_counter()
    result = run_bbh(model, tok, cfg, out, progress=False)
    return {"result": result, "seconds": time.perf_counter() - t0}


def our_prompts(tasks: list[str], protocol: str, data_root: Path, limit: int | None) -> dict[str, str]:
    from mtlora.eval import bbh

    prompts = {}
    for task in tasks:
        _, examples = bbh.load_task(task, data_root, protocol)
        n = len(examples) if limit is None else min(limit, len(examples))
        for i, ex in enumerate(examples[:n]):
            prompts[f"{task}/{i}"] = bbh.build_prompt(protocol, task, ex["input"], data_root)
    return prompts


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run-dir", type=Path, help="a finished mtlora run dir")
    src.add_argument("--model-dir", type=Path, help="an HF model dir (instead of a run dir)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer dir for --model-dir (default: the model dir)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated BBH tasks, or 'all'")
    ap.add_argument("--limit", type=int, default=5, help="first N examples per task (0 = all)")
    ap.add_argument("--protocol", default="lmeval_fewshot", choices=sorted(LMEVAL_VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", default=None, help="dir holding bbh/ (default $MTLORA_DATA_DIR)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="context length for prompt truncation on both sides: lm-eval's max_length model argument and our "
        "eval.bbh.model_max_length (default: read from the model config, as both do)",
    )
    ap.add_argument("--lmeval-batch-size", default="1")
    ap.add_argument(
        "--prompts-only",
        action="store_true",
        help="no model: compare every prompt and the decode settings with lm-eval's requests (fast, all examples)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (both sides)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="our run_bbh token budget per batch")
    ap.add_argument(
        "--ours-model",
        choices=["hf", "run"],
        default="hf",
        help="hf: our pipeline on the same HF dir lm-eval loads; run: load_run (adapters unmerged)",
    )
    ap.add_argument(
        "--ours-question",
        default=None,
        help="diagnostic: override our protocol's final-question template (e.g. to test a fix); "
        "recorded in the report",
    )
    a = ap.parse_args(argv)
    if not a.prompts_only and a.run_dir is None and a.model_dir is None:
        ap.error("one of --run-dir / --model-dir is required (or --prompts-only)")
    if a.ours_model == "run" and a.run_dir is None:
        ap.error("--ours-model run needs --run-dir")
    a.limit = None if a.limit == 0 else a.limit
    return a


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from mtlora.eval import bbh

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-eval is not installed: pip install 'mtlora[crosscheck]'", file=sys.stderr)
        return 2
    if args.ours_question is not None:  # diagnostic override, in this process only
        import dataclasses

        p = bbh.PROTOCOLS[args.protocol]
        q = args.ours_question.encode().decode("unicode_escape")
        bbh.PROTOCOLS[args.protocol] = dataclasses.replace(
            p, prompt=dataclasses.replace(p.prompt, question=q)
        )
        print(f"NOTE: our {args.protocol} question template overridden to {q!r}", flush=True)
    tasks = (
        list(bbh.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    )
    for t in tasks:
        bbh.answer_type(t)
    data_dir = bbh.bbh_dir(args.data_dir)
    args.data_root = data_dir
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.prompts_only:
        names = write_task_dir(out / "lmeval_tasks", tasks, args.protocol, data_dir)
        rep = prompt_check(
            our_prompts(tasks, args.protocol, data_dir, args.limit),
            lmeval_prompts(out / "lmeval_tasks", names, args.limit),
            args.protocol,
        )
        rep.update(
            {
                "protocol": args.protocol,
                "bbh_tasks": tasks,
                "limit": args.limit,
                "ours_question_override": args.ours_question,
            }
        )
        (out / "prompt_check.json").write_text(json.dumps(rep, indent=2) + "\n")
        bad = {t: v for t, v in rep["tasks"].items() if v["same_prompt"] != v["compared"]}
        print(
            f"{rep['compared']} prompts compared over {len(rep['tasks'])} tasks: {rep['same_prompt']} identical; "
            f"tasks with differences: {bad or 'none'}; decode settings identical: {rep['same_decode']} "
            f"(ours {rep['ours_decode']}, lm-eval {rep['lmeval_decode']}). Report: {out / 'prompt_check.json'}"
        )
        for d in rep["disagreements"][:3]:
            print(json.dumps(d)[:600])
        ok = rep["same_prompt"] == rep["compared"] and rep["same_decode"] and not rep["only_ours"]
        return 0 if ok and not rep["only_lmeval"] else 1
    if args.run_dir is not None:
        model_dir, tok_dir = hf_model_dir(args.run_dir, out)
    else:
        model_dir, tok_dir = args.model_dir, args.tokenizer or args.model_dir
    print(f"HF model dir: {model_dir} (tokenizer {tok_dir})", flush=True)
    names = write_task_dir(out / "lmeval_tasks", tasks, args.protocol, data_dir)

    le = run_lmeval(model_dir, tok_dir, out / "lmeval_tasks", names, args)
    samples = le["results"]["samples"]
    theirs = {}
    for task, name in names.items():
        theirs.update(records_from_lmeval_samples(samples[name], task))
    ours_run = run_ours(model_dir, tok_dir, tasks, args, out / "ours")
    pred_dir = out / "ours" / "predictions" / f"bbh_{args.protocol}"
    ours = records_from_ours(pred_dir, tasks, our_prompts(tasks, args.protocol, data_dir, args.limit))

    report = compare_records(ours, theirs)
    import lm_eval as _le

    versions = {name: le["results"].get("versions", {}).get(name) for name in names.values()}
    report.update(
        {
            "protocol": args.protocol,
            "lmeval_variant": LMEVAL_VARIANTS[args.protocol],
            "lmeval_version": getattr(_le, "__version__", None),
            "lmeval_task_versions": versions,
            "lmeval_model_args": le["model_args"],
            "lmeval_batch_size": args.lmeval_batch_size,
            "ours_model": args.ours_model,
            "ours_question_override": args.ours_question,
            "model_dir": str(model_dir),
            "run_dir": str(args.run_dir) if args.run_dir else None,
            "bbh_tasks": tasks,
            "limit": args.limit,
            "seconds": {"lmeval": round(le["seconds"], 2), "ours": round(ours_run["seconds"], 2)},
            "accuracy": {
                "ours_micro": ours_run["result"]["micro"]["accuracy"],
                "lmeval": {
                    n: next(
                        (v for k, v in le["results"]["results"][n].items() if k.startswith("exact_match,")),
                        None,
                    )
                    for n in names.values()
                },
            },
        }
    )
    (out / "crosscheck_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    t = report["totals"]
    print(
        f"\n{t['compared']} examples compared: prompts {t['same_prompt']}, generations {t['same_generation']}, "
        f"extractions {t['same_extracted']}, correctness {t['same_correct']} identical; "
        f"{report['n_disagreements']} disagreeing; only ours {len(report['only_ours'])}, "
        f"only lm-eval {len(report['only_lmeval'])}. Report: {out / 'crosscheck_report.json'}"
    )
    for d in report["disagreements"][:5]:
        print(json.dumps(d, default=str)[:800])
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
