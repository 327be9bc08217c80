"""BBH answer extraction: the table :data:`EXTRACTORS` maps each protocol's ``extraction`` key to how the answer
is read out of a generation (after the stop strings) and compared with the target under the same rule."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mtlora.errors import ConfigError
from mtlora.eval.bbh.protocols import MULTIPLE_CHOICE, NUMBER, Protocol, answer_type, get_protocol

LMEVAL_COT_REGEX = re.compile(r"(?<=the answer is )(.*)(?=.)")
LMEVAL_FALLBACK = "[invalid]"
_OPTION = re.compile(r"\(([A-Z])\)")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
# UNVERIFIED: the exact number regex of Align-LoRA's "first number in output"; signed int or decimal assumed.
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OC_MCQ = re.compile(r"\(([A-Z])\)*")  # OpenCompass bbh_mcq_postprocess, first "(X" (closing paren optional)
_OC_CAPITAL = re.compile(r"([A-Z])")
_OC_BOLD = re.compile(r"\*\*(.*?)\*\*")


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut at each stop string in turn, as lm-eval does (``s = s.split(term)[0]``): the earliest one wins.

    Trap reproduced on purpose: lm-eval's stop ``"Q"`` cuts at any capital Q, so the 7 gold ``(Q)`` answers of
    reasoning_about_colored_objects can never be scored correct under the two lm-eval presets.
    """
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def _lmeval_cot(gen: str) -> str:
    # lm-eval RegexFilter: findall, group_select 0 (first match), strip(), fallback "[invalid]".
    # Trap: (?=.) needs one more character after the answer, which is dropped: "(B)." -> "(B)" but
    # "(B). " -> "(B)." and "(B)" (no period) -> "(B". Lowercase "the answer is" only.
    m = LMEVAL_COT_REGEX.findall(gen)
    return m[0].strip() if m else LMEVAL_FALLBACK


def _align_after_last_answer(gen: str) -> str:
    # Align-LoRA decodes prompt+generation and takes the text after the LAST "Answer:". The prompt ends in
    # "Answer:", so this is the generation itself unless the generation contains "Answer:" (e.g. a
    # hallucinated next exemplar), in which case the text after the generation's last "Answer:" is used.
    return gen.rsplit("Answer:", 1)[-1]


def align_option(text: str) -> str:
    m = _OPTION.findall(text)
    if m:
        return f"({m[-1]})"
    # UNVERIFIED: "last lone capital letter" read as a capital not adjacent to other letters.
    m = _LONE_CAPITAL.findall(text)
    return f"({m[-1]})" if m else text.strip()


def _align_norm(text: str) -> str:
    return text.strip().lower().replace(".", "")


def _align_kind(task: str) -> str:
    # Align-LoRA picks the rule from the type of the task's first target; our table stands in for that.
    return {MULTIPLE_CHOICE: "option", NUMBER: "number"}.get(answer_type(task), "exact")


def _align_lora(gen: str, task: str) -> str:
    ans = _align_after_last_answer(gen)
    kind = _align_kind(task)
    if kind == "number":
        m = _NUMBER.search(ans)
        return m.group(0) if m else ans.strip()
    if kind == "option":
        return align_option(ans)
    return _align_norm(ans)


def _after_answer_is(text: str) -> str:
    # OpenCompass: ans.split('answer is ')[1].strip(): the text between the FIRST and the second "answer is ".
    parts = text.split("answer is ")
    return parts[1].strip() if len(parts) != 1 else text


def opencompass_mcq(text: str) -> str:
    """OpenCompass ``bbh_mcq_postprocess`` (also applied to the target: "(A)" -> "A")."""
    ans = _after_answer_is(text)
    m = _OC_MCQ.search(ans) or _OC_CAPITAL.search(ans)
    return m.group(1) if m else ans


def opencompass_freeform(text: str) -> str:
    """OpenCompass ``bbh_freeform_postprocess``."""
    ans = _after_answer_is(text).split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    # Not in data.md: current OpenCompass source also returns the first **bold** span if there is one.
    m = _OC_BOLD.search(ans)
    return m.group(1) if m else ans


def lmeval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's ``exact_match`` on one pair (no ignore options, as its BBH tasks use it).

    It compares ``np.asarray([prediction]) == np.asarray([reference])``; NumPy's fixed-width unicode
    strings drop trailing NUL characters, so ``"(A)\\0"`` equals ``"(A)"``. Leading and inner NULs count."""
    return prediction.rstrip("\0") == reference.rstrip("\0")


def _align_match(pred: str, target: str, task: str) -> bool:
    kind = _align_kind(task)
    if kind == "number":
        try:
            return float(pred) == float(target)
        except ValueError:
            return False
    if kind == "option":
        return pred == align_option(target)
    return pred == _align_norm(target)


def _opencompass(gen: str, task: str) -> str:
    return opencompass_mcq(gen) if answer_type(task) == MULTIPLE_CHOICE else opencompass_freeform(gen)


def _opencompass_match(pred: str, target: str, task: str) -> bool:
    if answer_type(task) == MULTIPLE_CHOICE:
        return pred == opencompass_mcq(target)
    return pred == target


@dataclass(frozen=True)
class Extractor:
    """One answer format: ``read(generation, task)`` gives the answer (the generation is already cut at the
    protocol's stop strings); ``match(answer, target, task)`` says whether it counts as correct."""

    read: Callable[[str, str], str]
    match: Callable[[str, str, str], bool]


def _lmeval_match(pred: str, target: str, task: str) -> bool:
    return lmeval_exact_match(pred, target)


# UNVERIFIED (mtlora_lenient): whether eval_bbh.py strips the decoded text; it does not change the match result.
EXTRACTORS: dict[str, Extractor] = {
    "lmeval_cot_regex": Extractor(lambda gen, task: _lmeval_cot(gen), _lmeval_match),
    "raw": Extractor(lambda gen, task: gen, _lmeval_match),
    "mtlora_lenient": Extractor(
        lambda gen, task: gen.strip(),
        lambda pred, target, task: target.lower() in pred.lower() or pred.startswith(target),
    ),
    "align_lora": Extractor(_align_lora, _align_match),
    "opencompass": Extractor(_opencompass, _opencompass_match),
}


def extractor(protocol: Protocol) -> Extractor:
    """The :data:`EXTRACTORS` entry of ``protocol.extraction``."""
    try:
        return EXTRACTORS[protocol.extraction]
    except KeyError:
        raise ConfigError(
            f"protocol {protocol.name!r} has unknown extraction {protocol.extraction!r}"
        ) from None


def extract(protocol: str | Protocol, task: str, generation: str) -> str:
    """The answer the protocol reads out of ``generation`` (the continuation only, without the prompt)."""
    p = get_protocol(protocol)
    answer_type(task)  # validate the task name for every protocol
    return extractor(p).read(truncate_at_stop(generation, p.decode.stop), task)
