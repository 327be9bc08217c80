"""BBH data and prompts, read at run time only: the task examples (``<data_dir>/bbh/<task>.json`` or the hub
dataset), the ``cot-prompts/`` and ``direct-prompts/`` exemplar files, and the prompt of each evaluated example
under a protocol."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from mtlora.errors import DataError
from mtlora.eval.bbh.protocols import N_SHOTS, Protocol, answer_type, get_protocol
from mtlora.utils.paths import default_data_dir

HUB_ID = "lukaemon/bbh"
HUB = "hub"  # data_dir value: the task examples from the hub dataset HUB_ID


def bbh_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/bbh`` (or ``data_dir`` itself if it already holds the task files).

    ``data_dir="hub"`` reads the task examples from :data:`HUB_ID`; the hub dataset has no prompt files, so
    the ``cot-prompts/`` and ``direct-prompts/`` that four protocols need still come from ``$MTLORA_DATA_DIR``
    (this function then returns that directory)."""
    hub = data_dir == HUB
    if hub:
        data_dir = None
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if (root / "bbh").is_dir():
        return root / "bbh"
    if (root / "boolean_expressions.json").is_file() or (root / "cot-prompts").is_dir():
        return root
    why = (
        f" (eval.bbh.data_dir=hub: the task examples come from {HUB_ID}, which has no prompt files)"
        if hub
        else f" (hub id {HUB_ID}: eval.bbh.data_dir=hub)"
    )
    raise DataError(
        f"BBH data directory {root / 'bbh'} does not exist. Point MTLORA_DATA_DIR (or the data_dir argument) at "
        f"a directory holding bbh/<task>.json, bbh/cot-prompts/ and bbh/direct-prompts/{why}."
    )


def _missing(path: Path, what: str) -> DataError:
    return DataError(
        f"BBH {what} {path} does not exist. Set MTLORA_DATA_DIR (or the data_dir argument) to a directory "
        f"holding bbh/<task>.json and bbh/{{cot,direct}}-prompts/<task>.txt (hub id {HUB_ID})."
    )


def _examples(task: str, data_dir) -> tuple[dict, ...]:
    """The examples of ``task``: ``<bbh dir>/<task>.json``, or the hub dataset's ``test`` split."""
    if data_dir == HUB:
        return _hub_examples(task)
    return _read_examples(str(bbh_dir(data_dir) / f"{task}.json"))


@functools.lru_cache(maxsize=32)
def _hub_examples(task: str) -> tuple[dict, ...]:
    from datasets import load_dataset

    try:
        rows = load_dataset(HUB_ID, task, split="test")
    except Exception as e:  # no network, no cache, unknown config: say what was asked and the way out
        raise DataError(
            f"could not load BBH task {task!r} from the hub ({HUB_ID}, config {task!r}, split 'test'): {e}. "
            "Set eval.bbh.data_dir (or MTLORA_DATA_DIR) to a local directory holding bbh/<task>.json."
        ) from e
    return tuple({"input": r["input"], "target": r["target"]} for r in rows)


@functools.lru_cache(maxsize=128)
def _read_examples(path: str) -> tuple[dict, ...]:
    p = Path(path)
    if not p.is_file():
        raise _missing(p, "task file")
    try:
        rows = json.loads(p.read_text())["examples"]
        return tuple({"input": r["input"], "target": r["target"]} for r in rows)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{p}: expected {{'examples': [{{'input', 'target'}}, ...]}} ({HUB_ID} format): {e}"
        ) from e


@functools.lru_cache(maxsize=128)
def _read_prompt_body(path: str) -> str:
    """The prompt file without its canary line and the ``-----`` line: description + 3 exemplars."""
    p = Path(path)
    if not p.is_file():
        raise _missing(p, "prompt file")
    lines = p.read_text().split("\n")
    if len(lines) < 3 or lines[1].strip() != "-----":
        raise DataError(f"{p}: expected a canary line, then '-----', then the prompt")
    return "\n".join(lines[2:]).strip()


def _split_prompt(body: str) -> tuple[str, list[dict]]:
    """(description, [{input, target}] x3) of a prompt body. For CoT files the target is the full rationale."""
    head, *chunks = re.split(r"(?:^|\n\n)Q: ", body)
    demos = []
    for c in chunks:
        q, sep, a = c.partition("\nA:")
        if not sep:
            raise DataError(f"prompt exemplar without '\\nA:': {c[:80]!r}")
        demos.append({"input": q, "target": a.strip()})
    return head.strip(), demos


def _prompt_path(task: str, kind: str, data_dir) -> Path:
    return bbh_dir(data_dir) / f"{kind}-prompts" / f"{task}.txt"


def load_task(
    task: str, data_dir=None, protocol: str | Protocol = "mtlora_direct"
) -> tuple[list[dict], list[dict]]:
    """(demos, eval_examples) for ``task`` under ``protocol``.

    ``mtlora_direct``: demos are the first 3 examples of the task file, which are removed from the evaluated set.
    Other protocols: demos are the 3 exemplars of the cot/direct prompt file and all examples are evaluated.
    """
    p = get_protocol(protocol)
    answer_type(task)
    examples = list(_examples(task, data_dir))
    if p.prompt.demos == "task_file":
        return examples[:N_SHOTS], examples[N_SHOTS:]
    if p.prompt.demos == "lmeval_direct":
        _, demos = _lmeval_direct(task, data_dir)
        return demos, examples
    _, demos = _split_prompt(_read_prompt_body(str(_prompt_path(task, p.prompt.demos, data_dir))))
    return demos, examples


def _lmeval_direct(task: str, data_dir) -> tuple[str, list[dict]]:
    """lm-eval's bbh_fewshot exemplars: description and questions of cot-prompts, answers of direct-prompts."""
    desc, cot = _split_prompt(_read_prompt_body(str(_prompt_path(task, "cot", data_dir))))
    _, direct = _split_prompt(_read_prompt_body(str(_prompt_path(task, "direct", data_dir))))
    return desc, [{"input": c["input"], "target": d["target"]} for c, d in zip(cot, direct)]


def build_prompt(protocol: str | Protocol, task: str, example_input: str, data_dir=None) -> str:
    """The full prompt for one evaluated example; the model continues right after it."""
    p = get_protocol(protocol)
    spec = p.prompt
    answer_type(task)
    question = spec.question.format(input=example_input)
    if spec.demos == "task_file":
        demos, _ = load_task(task, data_dir, p)
        context = "".join(spec.demo_format.format(**d) for d in demos) + question
    else:
        if spec.demos == "lmeval_direct":
            desc, demos = _lmeval_direct(task, data_dir)
            shots = "\n\n".join(f"Q: {d['input']}\nA: {d['target']}" for d in demos)
            body = f"{desc}\n\n{shots}" if spec.include_description and desc else shots
        else:
            body = _read_prompt_body(str(_prompt_path(task, spec.demos, data_dir)))
            if not spec.include_description:
                desc, _ = _split_prompt(body)
                body = body[len(desc) :].strip() if desc else body
        for old, new in spec.demo_replacements:
            body = body.replace(old, new)
        context = body + "\n\n" + question
    for old, new in spec.replacements:
        context = context.replace(old, new)
    return spec.prefix + context
