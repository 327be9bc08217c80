"""BBH protocol presets (:data:`PROTOCOLS`: prompt, decoding, answer extraction and matching of each reference
harness) and the answer type of each of the 27 tasks."""

from __future__ import annotations

from dataclasses import dataclass

from mtlora.errors import ConfigError

N_SHOTS = 3

# --------------------------------------------------------------------------------------------------------
# Answer type per task, hard-coded from docs/data.md §2.1 (checked against the real files in the unit tests).
#   multiple_choice: "(A)".."(R)"; binary: True/False, Yes/No, yes/no, valid/invalid; number: integers;
#   free_text: dyck_languages, word_sorting.
# Known data quirk: a few movie_recommendation / ruin_names targets are not "(X)" in the BBH release.
# --------------------------------------------------------------------------------------------------------
MULTIPLE_CHOICE, BINARY, NUMBER, FREE_TEXT = "multiple_choice", "binary", "number", "free_text"

ANSWER_TYPES: dict[str, str] = {
    "boolean_expressions": BINARY,
    "causal_judgement": BINARY,
    "date_understanding": MULTIPLE_CHOICE,
    "disambiguation_qa": MULTIPLE_CHOICE,
    "dyck_languages": FREE_TEXT,
    "formal_fallacies": BINARY,
    "geometric_shapes": MULTIPLE_CHOICE,
    "hyperbaton": MULTIPLE_CHOICE,
    "logical_deduction_five_objects": MULTIPLE_CHOICE,
    "logical_deduction_seven_objects": MULTIPLE_CHOICE,
    "logical_deduction_three_objects": MULTIPLE_CHOICE,
    "movie_recommendation": MULTIPLE_CHOICE,
    "multistep_arithmetic_two": NUMBER,
    "navigate": BINARY,
    "object_counting": NUMBER,
    "penguins_in_a_table": MULTIPLE_CHOICE,
    "reasoning_about_colored_objects": MULTIPLE_CHOICE,
    "ruin_names": MULTIPLE_CHOICE,
    "salient_translation_error_detection": MULTIPLE_CHOICE,
    "snarks": MULTIPLE_CHOICE,
    "sports_understanding": BINARY,
    "temporal_sequences": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_five_objects": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_seven_objects": MULTIPLE_CHOICE,
    "tracking_shuffled_objects_three_objects": MULTIPLE_CHOICE,
    "web_of_lies": BINARY,
    "word_sorting": FREE_TEXT,
}
TASKS: tuple[str, ...] = tuple(sorted(ANSWER_TYPES))


# --------------------------------------------------------------------------------------------------------
# Protocol presets
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    """How the few-shot prompt is built.

    ``demos``: ``"cot"`` / ``"direct"`` = the 3 exemplars of ``cot-prompts/<task>.txt`` /
    ``direct-prompts/<task>.txt`` (verbatim, after the canary and ``-----`` lines); ``"lmeval_direct"`` = what
    lm-eval's ``bbh_fewshot`` renders: the description and exemplar questions of ``cot-prompts`` with the
    answers of ``direct-prompts`` (the two files differ in 3 tasks: date_understanding, snarks,
    tracking_shuffled_objects_three_objects); ``"task_file"`` = the first 3 examples of ``<task>.json``, which
    are then excluded from the evaluated set. ``demo_replacements`` apply to the exemplar block only.
    """

    demos: str
    include_description: bool
    prefix: str = ""  # text before the description / exemplars
    question: str = "Q: {input}\nA:"  # the final, evaluated question
    demo_format: str = "Q: {input}\nA: {target}\n\n"  # only for demos == "task_file"
    replacements: tuple[tuple[str, str], ...] = ()  # applied to the whole prompt after the prefix
    demo_replacements: tuple[tuple[str, str], ...] = ()  # applied to the description + exemplars only


#: ``max_input_tokens`` value: the model's context length minus ``max_new_tokens`` (lm-eval's Hugging Face
#: model: ``max_ctx_len = max_length - max_gen_toks``, refused when <= 0)
MODEL_LENGTH = "model"


@dataclass(frozen=True)
class DecodeSpec:
    max_new_tokens: int
    stop: tuple[str, ...] = ()  # the continuation is cut at the earliest occurrence of any of these
    greedy: bool = True
    # prompts longer than this are cut (None: never; MODEL_LENGTH: context length - max_new_tokens)
    max_input_tokens: int | str | None = None
    truncation_side: str = "left"  # left: keep the end of the prompt; right: keep its start
    # True: the encoded ids are cut as they are, BOS included (lm-eval); False: only the text is cut
    truncate_special_tokens: bool = False


@dataclass(frozen=True)
class Protocol:
    name: str
    prompt: PromptSpec
    decode: DecodeSpec
    extraction: str  # key of mtlora.eval.bbh.extraction.EXTRACTORS
    matching: str  # human-readable rule, for reports
    aggregate: str  # what the source reports as the headline number
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "lmeval_cot_fewshot": Protocol(
        name="lmeval_cot_fewshot",
        # lm-eval 0.4.13 bbh_cot_fewshot (v4.0): description, 3 CoT exemplars (first_n, inlined from
        # cot-prompts), "Q: {input}\nA: Let's think step by step.\n", target_delimiter "". Checked against the
        # installed lm-eval's rendered prompts (scripts/crosscheck_lmeval.py --prompts-only, docs/benchmarks.md):
        # its exemplars always break the line after "step by step." (sports_understanding's file has a space).
        prompt=PromptSpec(
            demos="cot",
            include_description=True,
            question="Q: {input}\nA: Let's think step by step.\n",
            demo_replacements=(("A: Let's think step by step. ", "A: Let's think step by step.\n"),),
        ),
        # Prompt cut as lm-eval's HFLM.generate_until does: the encoded ids (BOS included) keep their last
        # max_length - max_gen_toks tokens, max_length from the model config; refused when that is <= 0.
        decode=DecodeSpec(
            max_new_tokens=1024,
            stop=("</s>", "Q", "\n\n"),
            max_input_tokens=MODEL_LENGTH,
            truncation_side="left",
            truncate_special_tokens=True,
        ),
        extraction="lmeval_cot_regex",
        matching="regex (?<=the answer is )(.*)(?=.) -> first match -> strip() (fallback '[invalid]'); "
        "exact match, case- and punctuation-sensitive, trailing NULs ignored",
        aggregate="micro (weight_by_size: true)",
        source="lm-eval bbh_cot_fewshot",
    ),
    "lmeval_fewshot": Protocol(
        name="lmeval_fewshot",
        # docs/data.md §2.1 (lm-eval): no whitespace stripping, so a BPE leading space (" False") fails; raw
        # continuation, strict exact match. Prompt checked against the installed lm-eval (all 6,511 examples identical).
        prompt=PromptSpec(demos="lmeval_direct", include_description=True),
        # max_gen_toks: HFLM's default 256 (the task sets none); prompt cut as for lmeval_cot_fewshot.
        decode=DecodeSpec(
            max_new_tokens=256,
            stop=("</s>", "Q", "\n\n"),
            max_input_tokens=MODEL_LENGTH,
            truncation_side="left",
            truncate_special_tokens=True,
        ),
        extraction="raw",
        matching="raw continuation (cut at stop strings) == target, strict, trailing NULs ignored",
        aggregate="micro (weight_by_size: true)",
        source="lm-eval bbh_fewshot",
    ),
    "mtlora_direct": Protocol(
        name="mtlora_direct",
        prompt=PromptSpec(demos="task_file", include_description=False),
        # greedy, left padding, max_length 2048; no stop strings (32 tokens may run into a fake next "Q:").
        # UNVERIFIED: max_length taken as input truncation with the tokenizer's default side (right).
        decode=DecodeSpec(max_new_tokens=32, max_input_tokens=2048, truncation_side="right"),
        extraction="mtlora_lenient",
        matching="target.lower() in generated.lower() or generated.startswith(target) (lenient substring; "
        "false positives such as 'not True' for target 'True' or '12' for target '2' are accepted)",
        aggregate="macro",
        source="mtLoRA eval_bbh.py",
    ),
    "align_lora": Protocol(
        name="align_lora",
        # UNVERIFIED (data.md §2.1): LoraHub's data_bbh few_shot.jsonl could not be read; taken to be the BBH
        # answer-only 3-shot prompt (direct-prompts, with its description line), with the replacements applied
        # to the whole context string (exemplars and question alike).
        prompt=PromptSpec(
            demos="direct",
            include_description=True,
            prefix="I will give you three examples, please answer the last question based on them.\n",
            replacements=(("Q:", "question:"), ("A:", "Answer:")),
        ),
        # UNVERIFIED: no explicit do_sample; greedy only if the checkpoint's generation_config says so.
        # Input truncated to 2048 tokens (data.md §2.1), with the tokenizer's default side (right; UNVERIFIED).
        decode=DecodeSpec(max_new_tokens=256, max_input_tokens=2048, truncation_side="right"),
        extraction="align_lora",
        matching="text after the LAST 'Answer:' of prompt+generation; number: first number == float(target); "
        "option: last (X), else last lone capital letter; else strip().lower() without '.' == same of target",
        aggregate="macro and micro (both printed)",
        source="Align-LoRA / R-LoRA eval_bbh.py",
    ),
    "opencompass_cot": Protocol(
        name="opencompass_cot",
        # UNVERIFIED (data.md §2.1): HydraLoRA only says "use opencompass"; default bbh_gen assumed. The
        # OpenCompass lib_prompt file is taken to be our cot-prompt body (description + exemplars, no canary).
        prompt=PromptSpec(
            demos="cot",
            include_description=True,
            prefix="Follow the given examples and answer the question.\n",
            question="Q: {input}\nA: Let's think step by step.",
        ),
        decode=DecodeSpec(max_new_tokens=512, stop=("Q:",)),
        extraction="opencompass",
        matching="MCQ: text after first 'answer is ' -> first (X / capital letter == letter of target; "
        "free-form: after 'answer is ', first line, strip trailing '.', exact match",
        aggregate="macro",
        source="OpenCompass bbh_gen (HydraLoRA)",
    ),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except KeyError:
        raise ConfigError(f"unknown BBH protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}") from None


def answer_type(task: str) -> str:
    try:
        return ANSWER_TYPES[task]
    except KeyError:
        raise ConfigError(f"unknown BBH task {task!r}; the 27 tasks are {list(TASKS)}") from None
