"""BBH protocols: extraction + matching traps per harness, prompt layout, answer-type table, macro vs micro.

Prompt-layout tests run on a small hand-made BBH-shaped directory (made-up questions), so they need no data;
the answer-type table is checked against the real task files when ``$MTLORA_DATA_DIR/bbh`` exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from mtlora.errors import ConfigError, DataError
from mtlora.eval import bbh
from mtlora.eval.bbh import PROTOCOLS, aggregate, build_prompt, extract, load_task, score
from mtlora.utils.paths import default_data_dir

CANARY = "CANARY LINE (made up for tests)"
TASK = "boolean_expressions"  # binary
MCQ = "date_understanding"


@pytest.fixture
def fake_data(tmp_path: Path) -> Path:
    """``<tmp>/bbh`` with made-up boolean_expressions / date_understanding files in the BBH layout."""
    d = tmp_path / "bbh"
    (d / "cot-prompts").mkdir(parents=True)
    (d / "direct-prompts").mkdir()
    for task, targets in ((TASK, ["True", "False"]), (MCQ, ["(A)", "(B)"])):
        examples = [{"input": f"{task} question {i}", "target": targets[i % 2]} for i in range(7)]
        (d / f"{task}.json").write_text(json.dumps({"canary": CANARY, "examples": examples}))
        desc = f"Description of {task}."
        direct = "\n\n".join(f"Q: demo {i} of {task}\nA: {targets[i % 2]}" for i in range(3))
        cot = "\n\n".join(
            f"Q: demo {i} of {task}\nA: Let's think step by step.\nStep one.\nStep two. So the answer is {targets[i % 2]}."
            for i in range(3)
        )
        (d / "direct-prompts" / f"{task}.txt").write_text(f"{CANARY}\n-----\n{desc}\n\n{direct}")
        (d / "cot-prompts" / f"{task}.txt").write_text(f"{CANARY}\n-----\n{desc}\n\n{cot}")
    return tmp_path


# ------------------------------------------------------------------ presets
def test_presets_are_frozen_and_complete():
    assert set(PROTOCOLS) == {
        "lmeval_cot_fewshot",
        "lmeval_fewshot",
        "mtlora_direct",
        "align_lora",
        "opencompass_cot",
    }
    p = PROTOCOLS["lmeval_cot_fewshot"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "x"  # type: ignore[misc]
    assert p.decode.stop == ("</s>", "Q", "\n\n") and p.decode.max_new_tokens == 1024
    assert PROTOCOLS["lmeval_fewshot"].decode.stop == ("</s>", "Q", "\n\n")
    for name in ("lmeval_cot_fewshot", "lmeval_fewshot"):  # lm-eval's HFLM: last (L - max_gen_toks) ids
        d = PROTOCOLS[name].decode
        assert (d.max_input_tokens, d.truncation_side, d.truncate_special_tokens) == ("model", "left", True)
    assert PROTOCOLS["mtlora_direct"].decode.max_new_tokens == 32
    assert PROTOCOLS["align_lora"].decode.max_new_tokens == 256
    assert PROTOCOLS["opencompass_cot"].decode == bbh.DecodeSpec(max_new_tokens=512, stop=("Q:",))
    assert bbh.LMEVAL_COT_REGEX.pattern == r"(?<=the answer is )(.*)(?=.)"


def test_unknown_protocol_and_task():
    with pytest.raises(ConfigError, match="mtlora_direct"):
        score("nope", TASK, "True", "True")
    with pytest.raises(ConfigError, match="boolean_expressions"):
        score("mtlora_direct", "not_a_task", "True", "True")


# ------------------------------------------------------------------ lm-eval CoT
@pytest.mark.parametrize(
    "gen, extracted, ok",
    [
        ("Step. So the answer is (A).", "(A)", True),
        ("Step. So the answer is (A). ", "(A).", False),  # trailing space: regex keeps the period -> fails
        ("Step. So the answer is (A)", "(A", False),  # no trailing char: last char of the answer is lost
        ("Step. So the answer is (A).\n\nQ: next one", "(A)", True),  # cut at the stop strings first
        ("Step. The answer is (A).", "[invalid]", False),  # capital "The": no match
        ("So the answer is (a).", "(a)", False),  # case-sensitive
        ("the answer is (B). Then the answer is (A).", "(B). Then the answer is (A)", False),  # greedy .*
    ],
)
def test_lmeval_cot_regex_traps(gen, extracted, ok):
    assert extract("lmeval_cot_fewshot", MCQ, gen) == extracted
    assert score("lmeval_cot_fewshot", MCQ, gen, "(A)") is ok


def test_lmeval_cot_stop_q_truncates_at_any_capital_q():
    # stop "Q" cuts before the answer sentence when the rationale contains a capital Q
    gen = "Quentin is lying. So the answer is No."
    assert extract("lmeval_cot_fewshot", "web_of_lies", gen) == "[invalid]"
    assert score("lmeval_cot_fewshot", "web_of_lies", "He lies. So the answer is No.", "No")


def test_lmeval_stop_q_makes_option_q_unscorable():
    # reasoning_about_colored_objects has 7 gold "(Q)" targets: the stop "Q" cuts them to "(" in both variants.
    task = "reasoning_about_colored_objects"
    assert not score("lmeval_fewshot", task, "(Q)", "(Q)")
    assert not score("lmeval_cot_fewshot", task, "So the answer is (Q).", "(Q)")
    assert score("opencompass_cot", task, "So the answer is (Q).", "(Q)")


def test_lmeval_fewshot_strict():
    assert score("lmeval_fewshot", TASK, "False", "False")
    assert score("lmeval_fewshot", TASK, "False\n\nQ: more", "False")
    assert not score("lmeval_fewshot", TASK, " False", "False")  # no stripping (unverified on Qwen BPE)
    assert not score("lmeval_fewshot", TASK, "false", "False")
    assert not score("lmeval_fewshot", MCQ, "So the answer is (A).", "(A)")


@pytest.mark.parametrize(
    "protocol, gen, target",
    [
        ("lmeval_fewshot", "False\0", "False"),  # trailing NUL in the generation
        ("lmeval_fewshot", "False\0\0\0", "False"),
        ("lmeval_fewshot", "False", "False\0"),  # ... or in the reference
        ("lmeval_fewshot", "\0False", "False"),  # a leading NUL counts
        ("lmeval_fewshot", "Fal\0se", "False"),  # an inner NUL counts
        ("lmeval_fewshot", "False \0", "False"),  # only NULs go, not the space before them
        ("lmeval_fewshot", "\0", ""),
        ("lmeval_cot_fewshot", "So the answer is (A)\0\0", "(A)"),  # regex keeps "(A)\0", strip() keeps NULs
        ("lmeval_cot_fewshot", "So the answer is (A).\0\0", "(A)"),  # "(A).\0": the period still counts
    ],
)
def test_lmeval_exact_match_ignores_trailing_nuls_like_numpy_string_compare(protocol, gen, target):
    """lm-eval's exact_match compares ``np.asarray(predictions) == np.asarray(references)``: NumPy's
    fixed-width unicode strings drop trailing NULs. The reference here is that comparison itself."""
    np = pytest.importorskip("numpy")
    pred = extract(protocol, MCQ if "cot" in protocol else TASK, gen)
    want = bool((np.asarray([pred]) == np.asarray([target]))[0])
    assert score(protocol, MCQ if "cot" in protocol else TASK, gen, target) is want
    assert bbh.lmeval_exact_match(pred, target) is want


# ------------------------------------------------------------------ mtLoRA lenient
def test_mtlora_lenient_substring():
    assert score("mtlora_direct", TASK, " True, because not False is True", "True")
    assert score("mtlora_direct", TASK, "true", "True")  # case-insensitive substring
    assert score("mtlora_direct", MCQ, " So the answer is (A).", "(A)")
    assert not score("mtlora_direct", MCQ, " (B)", "(A)")
    assert extract("mtlora_direct", TASK, "  True\n") == "True"


def test_mtlora_lenient_false_positives_are_reproduced():
    # Documented false positives of the lenient rule: these are *accepted* by mtLoRA's scorer.
    assert score("mtlora_direct", TASK, "not True", "True")
    assert score("mtlora_direct", "object_counting", "12", "2")
    assert score("mtlora_direct", TASK, "False\n\nQ: x is\nA: True", "True")  # no stop string at 32 tokens


# ------------------------------------------------------------------ Align-LoRA
def test_align_lora_numbers_float_compare():
    assert score("align_lora", "object_counting", " 12", "12")
    assert score("align_lora", "object_counting", " 12.0 objects", "12")
    assert score("align_lora", "multistep_arithmetic_two", " -50, since ...", "-50")
    assert not score("align_lora", "object_counting", " 13 or 12", "12")  # FIRST number
    assert not score("align_lora", "object_counting", " twelve", "12")


def test_align_lora_option_takes_last():
    assert extract("align_lora", MCQ, " (A) or maybe (B)") == "(B)"
    assert score("align_lora", MCQ, " (A) or maybe (B)", "(B)")
    assert not score("align_lora", MCQ, " (A) or maybe (B)", "(A)")
    assert score("align_lora", MCQ, " The answer: B", "(B)")  # last lone capital letter fallback
    assert extract("align_lora", MCQ, " I think it's C") == "(C)"


def test_align_lora_after_last_answer_marker():
    gen = " (A)\n\nquestion: another one\nAnswer: (C)"
    assert extract("align_lora", MCQ, gen) == "(C)"  # a hallucinated exemplar's answer wins
    assert score("align_lora", TASK, " True.", "True")  # strip, lower, drop "."
    assert score("align_lora", TASK, "TRUE", "True")
    assert not score("align_lora", TASK, " True, because", "True")  # exact, unlike mtLoRA
    assert score("align_lora", "word_sorting", " Apple banana.", "apple banana")


# ------------------------------------------------------------------ OpenCompass
def test_opencompass_mcq_first_after_answer_is():
    gen = "(C) looks tempting. So the answer is (A). Not (B)."
    assert extract("opencompass_cot", MCQ, gen) == "A"
    assert score("opencompass_cot", MCQ, gen, "(A)")
    assert score("opencompass_cot", MCQ, "So the answer is B.", "(B)")  # capital-letter fallback
    assert extract("opencompass_cot", MCQ, "(D) is wrong, (E) too") == "D"  # no "answer is": first (X
    assert not score("opencompass_cot", MCQ, "So the answer is (a).", "(A)")


def test_opencompass_freeform():
    assert score("opencompass_cot", TASK, "... So the answer is True.\nMore text", "True")
    assert score("opencompass_cot", "object_counting", "So the answer is 12.", "12")
    assert not score("opencompass_cot", "object_counting", "So the answer is 12.0.", "12")  # exact string
    assert not score("opencompass_cot", TASK, "So the answer is true.", "True")  # case-sensitive
    assert score("opencompass_cot", "dyck_languages", "So the answer is ] ) >.", "] ) >")
    assert score("opencompass_cot", TASK, "So the answer is True.\n\nQ: next\nA: False", "True")  # stop "Q:"


# ------------------------------------------------------------------ prompts
def test_build_prompt_lmeval_cot(fake_data):
    s = build_prompt("lmeval_cot_fewshot", MCQ, "What day?", fake_data)
    assert s.startswith(f"Description of {MCQ}.\n\nQ: demo 0")
    assert CANARY not in s and "-----" not in s
    assert s.count("\nA: Let's think step by step.") == 4 and s.count("So the answer is") == 3
    assert s.endswith("So the answer is (A).\n\nQ: What day?\nA: Let's think step by step.\n")


def test_lmeval_cot_exemplars_break_the_line_after_step_by_step(fake_data):
    """lm-eval renders every exemplar as "A: Let's think step by step.\n<rationale>"; sports_understanding's
    prompt file has a space there instead."""
    f = fake_data / "bbh" / "cot-prompts" / f"{MCQ}.txt"
    f.write_text(f.read_text().replace("step by step.\nStep one.", "step by step. Step one."))
    s = build_prompt("lmeval_cot_fewshot", MCQ, "What day?", fake_data)
    assert "step by step. Step one." not in s and s.count("step by step.\nStep one.") == 3
    assert "step by step. Step one." in build_prompt("opencompass_cot", MCQ, "What day?", fake_data)


def test_lmeval_fewshot_takes_questions_from_cot_and_answers_from_direct(fake_data):
    """lm-eval's bbh_fewshot inlines the description and questions of cot-prompts with the direct answers; the
    direct-prompts file can differ (e.g. date_understanding's years, snarks' description)."""
    f = fake_data / "bbh" / "direct-prompts" / f"{TASK}.txt"
    f.write_text(
        f.read_text().replace("Description of", "Old description of").replace("demo 1 of", "typo 1 of")
    )
    s = build_prompt("lmeval_fewshot", TASK, "x is", fake_data)
    assert s.startswith(f"Description of {TASK}.\n\nQ: demo 0") and "typo" not in s and "Old" not in s
    demos, _ = load_task(TASK, fake_data, "lmeval_fewshot")
    assert [d["input"] for d in demos] == [f"demo {i} of {TASK}" for i in range(3)]
    assert [d["target"] for d in demos] == ["True", "False", "True"]


def test_build_prompt_lmeval_fewshot(fake_data):
    s = build_prompt("lmeval_fewshot", TASK, "x is", fake_data)
    assert s == (
        f"Description of {TASK}.\n\nQ: demo 0 of {TASK}\nA: True\n\nQ: demo 1 of {TASK}\nA: False\n\n"
        f"Q: demo 2 of {TASK}\nA: True\n\nQ: x is\nA:"
    )


def test_build_prompt_and_load_task_mtlora(fake_data):
    demos, evals = load_task(TASK, fake_data, "mtlora_direct")
    assert [d["input"] for d in demos] == [f"{TASK} question {i}" for i in range(3)]
    assert len(evals) == 4 and evals[0]["input"] == f"{TASK} question 3"  # first 3 excluded
    s = build_prompt("mtlora_direct", TASK, "x is", fake_data)
    assert s == "".join(f"Q: {d['input']}\nA: {d['target']}\n\n" for d in demos) + "Q: x is\nA:"
    assert "Description" not in s


def test_build_prompt_align_lora(fake_data):
    s = build_prompt("align_lora", MCQ, "Which one?", fake_data)
    assert s.startswith("I will give you three examples, please answer the last question based on them.\n")
    assert "Q:" not in s and "\nA:" not in s
    assert s.count("question: ") == 4 and s.count("\nAnswer:") == 4
    assert s.endswith("Answer: (A)\n\nquestion: Which one?\nAnswer:")


def test_build_prompt_opencompass(fake_data):
    s = build_prompt("opencompass_cot", MCQ, "What day?", fake_data)
    assert s.startswith(
        f"Follow the given examples and answer the question.\nDescription of {MCQ}.\n\nQ: demo 0"
    )
    assert s.count("Q: ") == 4
    assert s.endswith("\n\nQ: What day?\nA: Let's think step by step.")


def test_load_task_prompt_demos(fake_data):
    demos, evals = load_task(MCQ, fake_data, "lmeval_cot_fewshot")
    assert len(demos) == 3 and len(evals) == 7
    assert demos[1]["input"] == f"demo 1 of {MCQ}" and demos[1]["target"].endswith("So the answer is (B).")


def test_missing_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLORA_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        load_task(TASK, None, "mtlora_direct")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "bbh") in msg and "MTLORA_DATA_DIR" in msg and "lukaemon/bbh" in msg
    (tmp_path / "bbh").mkdir()
    with pytest.raises(DataError) as e:
        build_prompt("lmeval_fewshot", TASK, "x", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "bbh" / "cot-prompts" / f"{TASK}.txt") in msg and "lukaemon/bbh" in msg


def _fake_hub(monkeypatch, rows_by_task: dict[str, list[dict]], calls: list | None = None) -> None:
    """``datasets.load_dataset`` answering ``(lukaemon/bbh, task, split="test")`` from ``rows_by_task``."""
    import datasets

    def load_dataset(path, name=None, split=None, **kw):
        if calls is not None:
            calls.append((path, name, split))
        if path != "lukaemon/bbh" or name not in rows_by_task:
            raise FileNotFoundError(f"Couldn't reach {path} on the Hub (offline)")
        return [dict(r, extra="ignored") for r in rows_by_task[name]]

    bbh._hub_examples.cache_clear()
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_examples_give_the_same_prompts_as_the_local_files(fake_data, monkeypatch):
    local = json.loads((fake_data / "bbh" / f"{MCQ}.json").read_text())["examples"]
    hub_rows = [{"input": r["input"] + " (hub)", "target": r["target"]} for r in local]
    calls: list = []
    _fake_hub(monkeypatch, {MCQ: hub_rows}, calls)
    # mtlora_direct needs only the examples: no local directory at all
    monkeypatch.setenv("MTLORA_DATA_DIR", str(fake_data / "nowhere"))
    demos, evals = load_task(MCQ, bbh.HUB, "mtlora_direct")
    assert demos == [{"input": r["input"], "target": r["target"]} for r in hub_rows[:3]]
    assert len(evals) == len(hub_rows) - 3
    s = build_prompt("mtlora_direct", MCQ, "Q?", bbh.HUB)
    assert s.startswith(f"Q: {hub_rows[0]['input']}\nA: {hub_rows[0]['target']}\n\n") and s.endswith(
        "Q: Q?\nA:"
    )
    assert calls[0] == ("lukaemon/bbh", MCQ, "test")
    # protocols with prompt files read them from MTLORA_DATA_DIR; without it the error says why
    with pytest.raises(DataError, match="has no prompt files"):
        build_prompt("lmeval_fewshot", MCQ, "Q?", bbh.HUB)
    monkeypatch.setenv("MTLORA_DATA_DIR", str(fake_data))
    assert build_prompt("lmeval_fewshot", MCQ, "Q?", bbh.HUB) == build_prompt(
        "lmeval_fewshot", MCQ, "Q?", fake_data
    )
    _, evals = load_task(MCQ, bbh.HUB, "lmeval_fewshot")
    assert [e["input"] for e in evals] == [r["input"] for r in hub_rows]


def test_hub_failure_names_the_hub_id_task_and_the_local_way(monkeypatch):
    _fake_hub(monkeypatch, {})
    with pytest.raises(DataError) as e:
        load_task(TASK, bbh.HUB, "mtlora_direct")
    msg = str(e.value)
    assert "lukaemon/bbh" in msg and repr(TASK) in msg and "MTLORA_DATA_DIR" in msg and "offline" in msg


# ------------------------------------------------------------------ answer types vs real data
REAL_BBH = default_data_dir() / "bbh"
# BBH release quirks: a few non-"(X)" targets in these two multiple-choice tasks.
_MCQ_QUIRKS = {"movie_recommendation", "ruin_names"}


def _type_of(target: str) -> str:
    if re.fullmatch(r"\([A-Z]\)", target):
        return bbh.MULTIPLE_CHOICE
    if target in {"True", "False", "Yes", "No", "yes", "no", "valid", "invalid"}:
        return bbh.BINARY
    if re.fullmatch(r"-?\d+", target):
        return bbh.NUMBER
    return bbh.FREE_TEXT


@pytest.mark.skipif(not REAL_BBH.is_dir(), reason=f"no BBH data at {REAL_BBH}")
def test_answer_type_table_matches_real_files():
    files = sorted(p.stem for p in REAL_BBH.glob("*.json"))
    assert files == sorted(bbh.ANSWER_TYPES), "table must list exactly the 27 task files"
    assert len(files) == 27
    for task in files:
        targets = [e["target"] for e in json.loads((REAL_BBH / f"{task}.json").read_text())["examples"]]
        types = [_type_of(t) for t in targets]
        expected = bbh.ANSWER_TYPES[task]
        assert types[0] == expected, task  # Align-LoRA keys its rule on the first target
        odd = [t for t, k in zip(targets, types) if k != expected]
        if task in _MCQ_QUIRKS:
            assert len(odd) <= 0.02 * len(targets), (task, odd)
        else:
            assert not odd, (task, odd[:5])


# ------------------------------------------------------------------ aggregate
def test_aggregate_macro_vs_micro():
    r = aggregate({"big": [True] * 9 + [False], "small": [False, False]})
    assert r["tasks"]["big"] == {"n": 10, "correct": 9, "accuracy": 0.9}
    assert r["tasks"]["small"]["accuracy"] == 0.0
    assert r["macro"]["accuracy"] == pytest.approx(0.45) and r["macro"]["n_tasks"] == 2
    assert r["micro"]["accuracy"] == pytest.approx(9 / 12) and r["micro"]["n"] == 12
    assert "papers" in r["macro"]["label"] and "lm-eval" in r["micro"]["label"]
    with pytest.raises(ValueError, match="empty"):
        aggregate({"empty": []})
