"""Answer metrics of the generation suites (mtlora.eval.scoring) on hand-made cases, traps included, and the
``eval.metric`` of every task config."""

from __future__ import annotations

from decimal import Decimal

import pytest
from omegaconf import OmegaConf

from mtlora.errors import ConfigError
from mtlora.eval import scoring as M
from tests.helpers.compose import CONF

COT = "Natalia sold 48 / 2 = 24 clips in May. 48 + 24 = 72.\nSo the answer is 72."


def test_final_answer_marker_line_and_period() -> None:
    assert M.final_answer("It rains. The final answer: yes.\nQuestion: next one") == "yes"
    assert M.final_answer("Answer: A") == "A"
    assert M.final_answer("The answer is 1. Really, the answer is (C).") == "(C)"  # the LAST marker
    assert M.final_answer("  no marker here.  ") == "no marker here."  # whole text, untouched period
    assert M.final_answer("The answerer said 5") == "The answerer said 5"  # "answerer" is no marker


@pytest.mark.parametrize(
    ("pred", "target", "ok"),
    [
        ("(A)", "A", True),
        ("A", "(A)", True),
        ("Answer: A", "(A)", True),
        ("So the answer is (A).", "(A)", True),
        ("(A) looks right but the answer is (B)", "(B)", True),
        ("(A) looks right but the answer is (B)", "(A)", False),
        ("I think B", "(A)", False),
        ("yes", "(A)", False),  # no letter never matches
        ("yes", "yes", False),  # not even two letterless texts
        ("Answer: a", "(A)", False),  # lower case is no option letter
    ],
)
def test_option_letter(pred: str, target: str, ok: bool) -> None:
    assert M.option_match(pred, target) is ok
    assert M.score("option", pred, target) == (ok, float(ok))


def test_option_letter_extraction() -> None:
    assert [M.option_letter(x) for x in ("(C)", "C", "Answer: C", "the answer is (C).", "none")] == [
        "C",
        "C",
        "C",
        "C",
        None,
    ]
    assert M.extract("option", "So the answer is (D).") == "D" and M.extract("option", "nope") == ""


@pytest.mark.parametrize(
    ("pred", "target", "ok"),
    [
        ("1,000", "1000", True),
        ("1000", " 1,000", True),
        ("72.0", "72", True),
        ("The answer is 72.", COT, True),
        ("24 then 72", " 72", True),  # the last number
        ("72 then 24", " 72", False),
        ("-3", "3", False),
        ("$10.", "10", True),
        ("no number", "no number", False),  # no number never matches
        ("12,34", "1234", False),  # not a thousands separator: two numbers, the last is 34
    ],
)
def test_number_match(pred: str, target: str, ok: bool) -> None:
    assert M.number_match(pred, target) is ok


def test_last_number_values() -> None:
    assert M.last_number("a 1,234,567.5 b") == Decimal("1234567.5")
    assert M.last_number(COT) == Decimal("72") and M.last_number("none") is None
    assert M.extract("number", "it is 1,000.") == "1000"


@pytest.mark.parametrize(
    ("pred", "target", "ok"),
    [
        (" Hello   World.", "hello world", True),  # case, whitespace runs, one trailing period
        ("hello worlds", "hello world", False),
        ("hello world!", "hello world", False),  # only a period is dropped
        ("yes", "Because of X. So the answer is yes.", True),  # CoT target: its final answer
        ("Thus, the answer is no.", "Because of X. So the answer is yes.", False),
        ("Sentence A", " Sentence A", True),
    ],
)
def test_exact_match(pred: str, target: str, ok: bool) -> None:
    assert M.exact_match(pred, target) is ok


def test_rouge_l_against_hand_computed_lcs() -> None:
    # LCS("a b c d", "a c e") = "a c": precision 2/4, recall 2/3, F1 = 2PR/(P+R) = 4/7
    assert M.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # "the cat on the mat" is the LCS of 5 tokens in 6 and 7: P 5/6, R 5/7, F1 = 10/13
    assert M.rouge_l("the cat sat on the mat", "The cat was sitting on the mat") == pytest.approx(10 / 13)
    assert M.rouge_l("x y", "x y") == 1.0 and M.rouge_l("", "x y") == 0.0
    # score: value is ROUGE-L F1, correct is whole-text exact match (no final-answer extraction)
    ok, v = M.score("rouge_l", "a b c d", "a c e")
    assert ok is False and v == pytest.approx(4 / 7)
    assert M.score("rouge_l", " The  answer is X.", "the answer is x") == (True, 1.0)
    assert M.score("rouge_l", "X", "The answer is X") == (False, pytest.approx(2 / 5))


def test_metric_names_checked() -> None:
    assert M.check_metric(None) == "exact"
    with pytest.raises(ConfigError, match=r"data.tasks.t.eval.metric='bleu'.*rouge_l"):
        M.check_metric("bleu", "data.tasks.t.eval.metric")
    with pytest.raises(ConfigError):
        M.score("bleu", "a", "a")


def test_task_configs_declare_fitting_metrics() -> None:
    got = {
        p.stem: OmegaConf.load(p).eval.get("metric") for p in sorted((CONF / "data" / "task").glob("*.yaml"))
    }
    assert all(m in M.METRICS for m in got.values()), got
    assert {t for t, m in got.items() if t.startswith("dolly_")} == {t for t in got if t.startswith("dolly_")}
    assert all(m == "rouge_l" for t, m in got.items() if t.startswith("dolly_") or t.endswith("translation"))
    assert got["flan_cot_gsm8k"] == "number" and got["synth_arithmetic"] == "number"
    assert got["flan_cot_aqua"] == got["flan_cot_qasc"] == "option"
    assert got["flan_cot_strategyqa"] == got["synth_word_sorting"] == "exact"
