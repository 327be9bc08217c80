"""The optional ``mmlu`` evaluation suite: MMLU 5-shot under mtLoRA's protocol (Dolly-15k -> MMLU).

Protocol (mtLoRA ``eval_mmlu.py``, ``docs/data.md`` §1.2): for each of the 57 subjects, the first
``shots`` rows of the subject's dev split as demonstrations, no subject header::

    Question: {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {X}\\n\\n     (x shots)
    Question: {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:

greedy generation of ``max_new_tokens`` tokens (mtLoRA: 1), prediction = first non-space character of the
generation (``"X"`` when it is empty), correct when it equals the gold letter. Generation rather than
comparing the logits of " A".." D" because that is what mtLoRA (whose Dolly->MMLU number we reproduce)
does; a model that answers with anything but the letter scores 0 on that row. With a byte-level tokenizer the
first generated token is the space, so such models need ``max_new_tokens >= 2``. Task-aware adapters get
``task_id`` for every prompt (mtLoRA passes task type 0 to its routing methods), an int or a training-task
name. Headline (mtLoRA's "overall accuracy") = ``micro`` (pooled over questions); ``macro`` = mean over
subjects; the four categories (STEM, humanities, social_sciences, other: mtLoRA's subject mapping) are means
of their subjects' accuracies.

Data (read at run time only), ``eval.mmlu.data_dir``:
  * null: ``$MTLORA_DATA_DIR/mmlu``; a path: that directory. Original Hendrycks CSV layout (no header;
    question, A, B, C, D, answer letter): ``dev/<subject>_dev.csv`` and ``test/<subject>_test.csv``.
  * ``hub``: ``datasets.load_dataset("cais/mmlu", subject)`` (needs the network or the HF cache).
A missing directory or file is a DataError naming the path, ``MTLORA_DATA_DIR`` and the hub id.

Outputs: ``metrics/eval_mmlu.{json,csv,md}`` (per subject, macro, micro, categories) and
``predictions/mmlu/<subject>.jsonl`` (``id`` = ``<subject>/<test row>``, ``prompt_sha1``, ``generation``,
``extracted``, ``target``, ``correct``).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from mtlora.errors import ConfigError, DataError
from mtlora.eval.outputs import write_suite_outputs
from mtlora.eval.scoring import summarize
from mtlora.eval.settings import resolve_settings, resolve_task_id
from mtlora.eval.suites import GENERATION, Suite, SuiteContext, register
from mtlora.utils.paths import default_data_dir

if TYPE_CHECKING:
    import torch

SUITE = "mmlu"
HUB_ID = "cais/mmlu"
ENV = "MTLORA_DATA_DIR"
LETTERS = ("A", "B", "C", "D")
DEFAULTS = {
    "subjects": None,
    "limit": None,
    "shots": 5,
    "max_new_tokens": 1,
    "data_dir": None,
    "batch_tokens": 16384,
    "max_batch_size": 64,
    "task_id": 0,
}
#: mtLoRA eval_mmlu.py's subject -> category mapping, grouped
CATEGORIES: dict[str, list[str]] = {
    "STEM": [
        "abstract_algebra",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ],
    "humanities": [
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ],
    "social_sciences": [
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ],
    "other": [
        "anatomy",
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ],
}
CATEGORY_OF = {s: c for c, subs in CATEGORIES.items() for s in subs}
SUBJECTS: tuple[str, ...] = tuple(sorted(CATEGORY_OF))


def _missing(path: Path) -> DataError:
    return DataError(
        f"MMLU data {path} does not exist. Set eval.mmlu.data_dir (or {ENV}, whose mmlu/ subfolder is used) "
        f"to a directory in the Hendrycks CSV layout (dev/<subject>_dev.csv, test/<subject>_test.csv), or "
        f"eval.mmlu.data_dir=hub to load hub id {HUB_ID} with datasets.load_dataset."
    )


def mmlu_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local MMLU directory (checked), or None for ``data_dir == "hub"``."""
    if data_dir == "hub":
        return None
    root = Path(data_dir) if data_dir else default_data_dir() / "mmlu"
    if not (root / "dev").is_dir() or not (root / "test").is_dir():
        raise _missing(root)
    return root


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise _missing(path)
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, r in enumerate(csv.reader(f)):
            if len(r) != 6 or r[5].strip() not in LETTERS:
                raise DataError(
                    f"{path}: row {i} is not question,A,B,C,D,answer-letter ({HUB_ID} CSV layout)"
                )
            rows.append({"question": r[0], "choices": r[1:5], "answer": r[5].strip()})
    return rows


def load_subject(subject: str, data_dir=None) -> tuple[list[dict], list[dict]]:
    """(dev rows, test rows) of ``subject``: ``{question, choices: [4], answer: letter}``."""
    if subject not in CATEGORY_OF:
        raise ConfigError(f"unknown MMLU subject {subject!r}; the 57 subjects are {list(SUBJECTS)}")
    root = mmlu_dir(data_dir)
    if root is not None:
        return _read_csv(root / "dev" / f"{subject}_dev.csv"), _read_csv(
            root / "test" / f"{subject}_test.csv"
        )
    from datasets import load_dataset

    ds = load_dataset(HUB_ID, subject)

    def conv(split: str) -> list[dict]:
        return [
            {"question": r["question"], "choices": list(r["choices"]), "answer": LETTERS[int(r["answer"])]}
            for r in ds[split]
        ]

    return conv("dev"), conv("test")


def format_question(row: dict) -> str:
    opts = "".join(f"{letter}. {c}\n" for letter, c in zip(LETTERS, row["choices"]))
    return f"Question: {row['question']}\n{opts}Answer:"


def build_prompt(dev: list[dict], row: dict, shots: int = 5) -> str:
    """mtLoRA's k-shot prompt: the first ``shots`` dev rows with their answers, then ``row``."""
    demos = "".join(f"{format_question(d)} {d['answer']}\n\n" for d in dev[:shots])
    return demos + format_question(row)


def extract(generation: str) -> str:
    """First non-space character of the generation, ``"X"`` when there is none (mtLoRA)."""
    g = generation.strip()
    return g[0] if g else "X"


def run_mmlu(
    model: torch.nn.Module,
    tokenizer,
    mmlu_cfg: DictConfig | dict | None,
    out_dir: Path,
    task_names: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Generate, score and write MMLU (see the module doc); returns the metrics dict written to JSON."""
    s = resolve_settings(mmlu_cfg, DEFAULTS, "eval.mmlu")
    subjects = list(SUBJECTS) if s["subjects"] is None else list(s["subjects"])
    root = mmlu_dir(s["data_dir"])  # fails before any generation
    task_id = resolve_task_id(model, s["task_id"], task_names, "eval.mmlu")
    items = []
    for subject in subjects:
        dev, test = load_subject(subject, s["data_dir"])
        if len(dev) < int(s["shots"]):
            raise DataError(f"MMLU {subject}: {len(dev)} dev rows, fewer than eval.mmlu.shots={s['shots']}")
        n = len(test) if s["limit"] is None else min(len(test), int(s["limit"]))
        for i, row in enumerate(test[:n]):
            items.append(
                {"subject": subject, "index": i, "prompt": build_prompt(dev, row, int(s["shots"])), **row}
            )
    from mtlora.eval import generate

    gens = generate.greedy_generate(
        model,
        tokenizer,
        [it["prompt"] for it in items],
        int(s["max_new_tokens"]),
        batch_tokens=int(s["batch_tokens"]),
        task_ids=task_id,
        progress=progress,
        max_batch_size=s["max_batch_size"],
        desc=SUITE,
    )
    scores: dict[str, list[tuple[bool, float]]] = {x: [] for x in subjects}
    preds: dict[str, list[dict]] = {x: [] for x in subjects}
    for it, gen in zip(items, gens):
        pred = extract(gen)
        ok = pred == it["answer"]
        scores[it["subject"]].append((ok, float(ok)))
        preds[it["subject"]].append(
            {
                "id": f"{it['subject']}/{it['index']}",
                "prompt_sha1": hashlib.sha1(it["prompt"].encode()).hexdigest(),
                "generation": gen,
                "extracted": pred,
                "target": it["answer"],
                "correct": bool(ok),
            }
        )
    summary = summarize(
        {x: {"category": CATEGORY_OF[x]} for x in subjects},
        scores,
        "unweighted mean of per-subject accuracies",
        "pooled accuracy over all questions (mtLoRA's overall accuracy)",
    )
    groups = {}
    for cat, subs in CATEGORIES.items():
        accs = [summary["tasks"][x]["accuracy"] for x in subjects if x in subs]
        if accs:
            groups[f"category:{cat}"] = {
                "n": sum(summary["tasks"][x]["n"] for x in subjects if x in subs),
                "accuracy": sum(accs) / len(accs),
                "n_subjects": len(accs),
            }
    result = {
        "suite": SUITE,
        "protocol": "mtLoRA eval_mmlu.py: k-shot from dev, greedy, first non-space char == gold letter",
        "settings": {k: s[k] for k in DEFAULTS},
        "data_dir": str(root) if root is not None else f"hub:{HUB_ID}",
        **summary,
        "groups": groups,
    }
    note = (
        f"MMLU {s['shots']}-shot, mtLoRA protocol. macro = {summary['macro']['label']}; micro = "
        f"{summary['micro']['label']}; category rows = mean of their subjects' accuracies."
    )
    write_suite_outputs(SUITE, result, ["task", "category", "n", "correct", "accuracy"], note, preds, out_dir)
    return result


def summary_line(result: dict) -> str:
    return (
        f"MMLU {result['settings']['shots']}-shot: micro {result['micro']['accuracy']:.4f} over "
        f"{result['micro']['n']} questions, macro {result['macro']['accuracy']:.4f} over "
        f"{result['macro']['n_tasks']} subjects"
    )


def _run(ctx: SuiteContext) -> dict:
    r = run_mmlu(
        ctx.model, ctx.tokenizer, ctx.eval_cfg.get(SUITE), ctx.out_dir, task_names=ctx.training_tasks()
    )
    ctx.report(
        SUITE, summary_line(r), {f"{SUITE}/macro": r["macro"]["score"], f"{SUITE}/micro": r["micro"]["score"]}
    )
    return r


EVAL_SUITE = register(Suite(SUITE, GENERATION, _run, needs=frozenset({"tokenizer", "task_names"})))
