"""BBH scoring: whether one generation is correct under a protocol, and the per-task / macro / micro
accuracies of a run."""

from __future__ import annotations

from mtlora.eval.bbh.extraction import extract, extractor
from mtlora.eval.bbh.protocols import Protocol, get_protocol


def score(protocol: str | Protocol, task: str, generation: str, target: str) -> bool:
    """Whether ``generation`` counts as correct for ``target`` under ``protocol``."""
    p = get_protocol(protocol)
    return extractor(p).match(extract(p, task, generation), target, task)


def aggregate(per_task_correct: dict[str, list[bool]]) -> dict:
    """Per-task accuracy plus ``macro`` (unweighted mean over tasks, what the papers report) and ``micro``
    (pooled over examples, lm-eval's ``weight_by_size`` headline)."""
    tasks = {}
    for name, flags in per_task_correct.items():
        if not flags:
            raise ValueError(f"BBH task {name!r} has no scored examples")
        c = sum(bool(f) for f in flags)
        tasks[name] = {"n": len(flags), "correct": c, "accuracy": c / len(flags)}
    n = sum(t["n"] for t in tasks.values())
    correct = sum(t["correct"] for t in tasks.values())
    return {
        "tasks": tasks,
        "macro": {
            "accuracy": sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else 0.0,
            "n_tasks": len(tasks),
            "label": "unweighted mean of per-task accuracies (reported by the papers)",
        },
        "micro": {
            "accuracy": correct / n if n else 0.0,
            "n": n,
            "label": "pooled accuracy over all examples (lm-eval weight_by_size)",
        },
    }
