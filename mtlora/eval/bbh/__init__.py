"""BIG-Bench Hard: prompt building, answer extraction and scoring under each reference paper's protocol.

Every paper in this family scores BBH with a *different* harness (see ``docs/data.md`` §2.1), and the
numbers are not comparable across harnesses. This package
reproduces each one as a named preset in :data:`PROTOCOLS`:

``lmeval_cot_fewshot``  lm-eval ``bbh_cot_fewshot``: description + 3 CoT exemplars, regex
                        ``(?<=the answer is )(.*)(?=.)``, strict exact match.
``lmeval_fewshot``      lm-eval ``bbh_fewshot``: description + 3 answer-only exemplars, raw continuation,
                        strict exact match.
                        Both lm-eval presets keep the last ``L - max_new_tokens`` prompt ids (``L``: the
                        model's context length, :data:`MODEL_LENGTH`), refuse ``L <= max_new_tokens``, and
                        ignore trailing NULs in the exact match, as lm-eval's Hugging Face model does.
``mtlora_direct``       mtLoRA ``eval_bbh.py``: first 3 task examples as demos (dropped from the eval set),
                        lenient substring match.
``align_lora``          Align-LoRA / R-LoRA ``eval_bbh.py``: LoraHub-style 3-shot prompt, text after the last
                        ``Answer:``, number / option / exact rule by answer type.
``opencompass_cot``     OpenCompass ``bbh_gen`` (HydraLoRA): CoT prompt, ``answer is`` extraction.

The data (``<data_dir>/bbh/<task>.json``, ``cot-prompts/`` and ``direct-prompts/``) is evaluation data: it is
only ever read at run time from ``data_dir`` (default: :func:`mtlora.utils.paths.default_data_dir`, i.e.
``$MTLORA_DATA_DIR``, else the ``shared/data`` folder beside the repository, as ``paths.data_dir``), never at
import; ``data_dir="hub"`` takes the task examples from the hub dataset ``lukaemon/bbh`` instead (the
prompt files, which it lacks, still come from the data folder). Readings ``docs/data.md`` marks as unverified
are implemented as documented and flagged ``UNVERIFIED``.
"""

from mtlora.eval.bbh.accuracy import aggregate, score
from mtlora.eval.bbh.data import (
    HUB,
    HUB_ID,
    _hub_examples,
    bbh_dir,
    build_prompt,
    load_task,
)
from mtlora.eval.bbh.extraction import (
    EXTRACTORS,
    LMEVAL_COT_REGEX,
    LMEVAL_FALLBACK,
    Extractor,
    align_option,
    extract,
    lmeval_exact_match,
    opencompass_freeform,
    opencompass_mcq,
    truncate_at_stop,
)
from mtlora.eval.bbh.protocols import (
    ANSWER_TYPES,
    BINARY,
    FREE_TEXT,
    MODEL_LENGTH,
    MULTIPLE_CHOICE,
    N_SHOTS,
    NUMBER,
    PROTOCOLS,
    TASKS,
    DecodeSpec,
    PromptSpec,
    Protocol,
    answer_type,
    get_protocol,
)

__all__ = [
    "ANSWER_TYPES",
    "BINARY",
    "EXTRACTORS",
    "FREE_TEXT",
    "HUB",
    "HUB_ID",
    "LMEVAL_COT_REGEX",
    "LMEVAL_FALLBACK",
    "MODEL_LENGTH",
    "MULTIPLE_CHOICE",
    "N_SHOTS",
    "NUMBER",
    "PROTOCOLS",
    "TASKS",
    "DecodeSpec",
    "Extractor",
    "PromptSpec",
    "Protocol",
    "_hub_examples",
    "aggregate",
    "align_option",
    "answer_type",
    "bbh_dir",
    "build_prompt",
    "extract",
    "get_protocol",
    "lmeval_exact_match",
    "load_task",
    "opencompass_freeform",
    "opencompass_mcq",
    "score",
    "truncate_at_stop",
]
