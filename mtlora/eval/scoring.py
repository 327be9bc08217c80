"""Scoring of the generation suites: the answer metric of each task (``eval.metric`` in
``conf/data/task/*.yaml``) and the per-task / macro / micro summary of the scored rows (:func:`summarize`).

Each metric reads an answer out of the generation and out of the target with the *same* rule, so a
chain-of-thought target ("... So the answer is (C).") and a bare target (" 72") are handled alike:

``exact``    :func:`final_answer`, then :func:`normalize` (casefold, whitespace runs -> one space, strip,
             one trailing ``.`` dropped); equal strings. The default when a task sets no ``eval.metric``.
``option``   :func:`option_letter` of the final answer: the last ``(X)``, else the last lone capital letter
             (Align-LoRA's rule, :func:`mtlora.eval.bbh.extraction.align_option`), so "(A)", "A", "Answer: A" and
             "So the answer is (A)." all read ``A``; no letter never matches.
``number``   :func:`last_number` of the final answer: thousands separators dropped ("1,000" = "1000"),
             compared as decimals ("72.0" = "72"); no number never matches.
``rouge_l``  free text (Dolly categories, translation, data-to-text): the reported score is the mean
             ROUGE-L F1 (``rouge-score``, its default tokenizer: lowercase alphanumeric tokens, no stemmer)
             of the whole generation against the whole target; ``correct`` is ``exact`` on the whole texts
             (no final-answer extraction, since free text may itself say "answer is").

:func:`final_answer`: the text after the last "answer is" / "answer:" marker (any case; covers every Flan-v2
CoT ending: "So the answer is X.", "The final answer: X.", "Therefore, the answer is X."), first line only,
one trailing ``.`` dropped; the whole stripped text when there is no marker.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation

from omegaconf import DictConfig, OmegaConf

from mtlora.errors import ConfigError
from mtlora.eval.bbh.extraction import align_option

METRICS = ("exact", "option", "number", "rouge_l")
DEFAULT_METRIC = "exact"

_ANSWER_MARK = re.compile(r"\banswer(?:\s+is\b|\s*:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"^\(([A-Z])\)$")


def check_metric(metric: str | None, where: str = "eval.metric") -> str:
    """``metric`` (``None`` -> :data:`DEFAULT_METRIC`) or a ConfigError naming ``where`` and the choices."""
    m = DEFAULT_METRIC if metric is None else metric
    if m not in METRICS:
        raise ConfigError(f"{where}={metric!r}: allowed values are {list(METRICS)}")
    return m


def _drop_period(text: str) -> str:
    return text[:-1].rstrip() if text.endswith(".") else text


def final_answer(text: str) -> str:
    """The text after the last answer marker (first line, trailing ``.`` dropped), else the stripped text."""
    marks = list(_ANSWER_MARK.finditer(text))
    if not marks:
        return text.strip()
    rest = text[marks[-1].end() :].strip()
    return _drop_period(rest.split("\n", 1)[0].strip())


def normalize(text: str) -> str:
    """Casefold, collapse whitespace, strip, drop one trailing period."""
    return _drop_period(" ".join(text.casefold().split()))


def option_letter(text: str) -> str | None:
    """The option letter of ``text``'s final answer (see the module doc), or None."""
    m = _LETTER.match(align_option(final_answer(text)))
    return m.group(1) if m else None


def last_number(text: str) -> Decimal | None:
    """The last number of ``text``'s final answer, thousands separators removed, or None."""
    found = _NUMBER.findall(final_answer(text))
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches valid decimals
        return None


def exact_match(prediction: str, target: str) -> bool:
    return normalize(final_answer(prediction)) == normalize(final_answer(target))


def option_match(prediction: str, target: str) -> bool:
    p = option_letter(prediction)
    return p is not None and p == option_letter(target)


def number_match(prediction: str, target: str) -> bool:
    p = last_number(prediction)
    return p is not None and p == last_number(target)


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``target`` (``rouge-score``, see the module doc)."""
    return float(_scorer().score(target, prediction)["rougeL"].fmeasure)


def extract(metric: str, text: str) -> str:
    """What ``metric`` reads out of ``text`` (for the predictions files)."""
    metric = check_metric(metric)
    if metric == "option":
        return option_letter(text) or ""
    if metric == "number":
        n = last_number(text)
        return "" if n is None else str(n)
    if metric == "rouge_l":
        return text.strip()
    return normalize(final_answer(text))


def score(metric: str, prediction: str, target: str) -> tuple[bool, float]:
    """``(correct, value)``: value is ROUGE-L F1 for ``rouge_l`` (correct = whole-text exact match), else
    ``float(correct)``."""
    metric = check_metric(metric)
    if metric == "rouge_l":
        return normalize(prediction) == normalize(target), rouge_l(prediction, target)
    ok = {"exact": exact_match, "option": option_match, "number": number_match}[metric](prediction, target)
    return ok, float(ok)


def task_metrics(data_cfg: DictConfig, task_names: list[str]) -> dict[str, str]:
    """``data.tasks.<task>.eval.metric`` of every task (``exact`` when missing), checked."""
    out = {}
    for name in task_names:
        m = OmegaConf.select(data_cfg, f"tasks.{name}.eval.metric", default=None)
        out[name] = check_metric(m, f"data.tasks.{name}.eval.metric")
    return out


def summarize(
    per_task: dict[str, dict], scores: dict[str, list[tuple[bool, float]]], macro_label: str, micro_label: str
) -> dict:
    """Per-task ``n``, ``correct``, ``accuracy`` = correct / n and ``score`` = mean value (merged over the
    entries of ``per_task``), then ``macro`` (unweighted mean over tasks) and ``micro`` (pooled over rows)."""
    tasks = {}
    for name, rows in scores.items():
        n = len(rows)
        c = sum(ok for ok, _ in rows)
        tasks[name] = {
            **per_task[name],
            "n": n,
            "correct": c,
            "accuracy": c / n if n else 0.0,
            "score": sum(v for _, v in rows) / n if n else 0.0,
        }
    n = sum(t["n"] for t in tasks.values())
    k = max(len(tasks), 1)
    return {
        "tasks": tasks,
        "macro": {
            "score": sum(t["score"] for t in tasks.values()) / k,
            "accuracy": sum(t["accuracy"] for t in tasks.values()) / k,
            "n_tasks": len(tasks),
            "label": macro_label,
        },
        "micro": {
            "score": sum(v for rows in scores.values() for _, v in rows) / max(n, 1),
            "accuracy": sum(t["correct"] for t in tasks.values()) / max(n, 1),
            "n": n,
            "label": micro_label,
        },
    }
