"""Synthetic generators: deterministic, distinct questions, answers recomputed independently here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mtlora.data.synthetic import GENERATORS, WORDS, generate
from mtlora.data.tasks import load_task
from tests.helpers.compose import REPO, compose_train

N = 300


# --------------------------------------------------------------------------- independent answer checkers


def _arith(question: str) -> str:
    m = re.fullmatch(r"(\d{1,2})([+-])(\d{1,2})", question)
    assert m, f"arithmetic question not of the form a+b / a-b: {question!r}"
    a, op, b = int(m[1]), m[2], int(m[3])
    return str(a + b if op == "+" else a - b)


def _sort(question: str) -> str:
    words = question.split(" ")
    assert 3 <= len(words) <= 5 and len(set(words)) == len(words), question
    assert all(w in WORDS for w in words), question
    return " ".join(sorted(words))


def _bool_eval(question: str) -> str:
    """A small recursive-descent evaluator (or < and < not), independent of Python's eval."""
    toks = question.split()
    assert toks and all(t in ("True", "False", "not", "and", "or") for t in toks), question
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take(expected=None):
        nonlocal pos
        t = toks[pos]
        assert expected is None or t == expected, question
        pos += 1
        return t

    def atom():
        if peek() == "not":
            take("not")
            return not atom()
        t = take()
        assert t in ("True", "False"), question
        return t == "True"

    def conj():
        v = atom()
        while peek() == "and":
            take("and")
            rhs = atom()
            v = v and rhs
        return v

    def disj():
        v = conj()
        while peek() == "or":
            take("or")
            rhs = conj()
            v = v or rhs
        return v

    v = disj()
    assert pos == len(toks), f"trailing tokens in {question!r}"
    return "True" if v else "False"


def _count(question: str) -> str:
    m = re.fullmatch(r"([a-e]) in ([a-e]{4,12})", question)
    assert m, f"counting question not of the form 'x in abcde…': {question!r}"
    return str(sum(1 for ch in m[2] if ch == m[1]))


def _reverse(question: str) -> str:
    assert re.fullmatch(r"[a-z]{3,8}", question), question
    return "".join(question[i] for i in range(len(question) - 1, -1, -1))


CHECKERS = {
    "arithmetic": _arith,
    "word_sorting": _sort,
    "boolean_expressions": _bool_eval,
    "counting": _count,
    "reverse": _reverse,
}


def test_checkers_cover_every_generator():
    assert set(CHECKERS) == set(GENERATORS)


def test_bool_evaluator_itself_uses_python_precedence():
    # guards the checker: `and` binds tighter than `or`, `not` tighter than both
    assert _bool_eval("True or False and False") == "True"
    assert _bool_eval("False and True or True") == "True"
    assert _bool_eval("not True or True") == "True"
    assert _bool_eval("not False and False") == "False"
    assert _bool_eval("False or not False and False") == "False"


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_answers_are_correct(name):
    rows = generate(name, N, seed=3)
    assert rows, name
    for row in rows:
        assert set(row) == {"question", "answer"}
        assert row["answer"] == CHECKERS[name](row["question"]), row


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_deterministic_for_a_seed_and_distinct_questions(name):
    a = generate(name, N, seed=11)
    b = generate(name, N, seed=11)
    assert a == b
    qs = [r["question"] for r in a]
    assert len(set(qs)) == len(qs)
    assert len(a) == N


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_different_seeds_differ(name):
    a = generate(name, 40, seed=0)
    b = generate(name, 40, seed=1)
    assert [r["question"] for r in a] != [r["question"] for r in b]


def test_prefix_property_and_size():
    # asking for more rows only appends: the first n rows do not depend on n
    assert generate("arithmetic", 50, seed=5) == generate("arithmetic", 120, seed=5)[:50]


def test_exhausted_space_returns_fewer_distinct_rows(monkeypatch):
    # a generator with 7 distinct questions: asking for 20 rows gives those 7, each once (the retries stop
    # after 50 x 20 draws). A real generator exhausted this way takes seconds (boolean expressions of 2-4
    # operands: 32 + 256 + 2048 forms, 150,000 draws for 3,000 rows).
    def seven(rng):
        q = str(rng.randrange(7))
        return {"question": q, "answer": q}

    monkeypatch.setitem(GENERATORS, "seven", seven)
    assert sorted(r["question"] for r in generate("seven", 20, seed=0)) == [str(i) for i in range(7)]
    qs = [r["question"] for r in generate("boolean_expressions", 600, seed=0)]
    assert len(set(qs)) == len(qs) == 600  # distinct while the space lasts


def test_answers_vary():
    # a generator stuck on one answer would pass the checks above with a wrong distribution
    for name in ("arithmetic", "boolean_expressions", "counting"):
        answers = {r["answer"] for r in generate(name, 200, seed=0)}
        assert len(answers) >= 2, name
    bools = [r["answer"] for r in generate("boolean_expressions", 400, seed=0)]
    assert 0.2 < bools.count("True") / len(bools) < 0.95


def test_same_rows_in_a_fresh_interpreter_with_another_hash_seed():
    # every rank/process must generate identical data: no dependence on PYTHONHASHSEED
    # load the module file alone (not the mtlora.data package, whose imports take seconds)
    code = (
        "import json, importlib.util as u; "
        f"s = u.spec_from_file_location('synthetic', {str(REPO / 'mtlora/data/synthetic.py')!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); generate = m.generate; "
        "print(json.dumps({n: generate(n, 30, 7) for n in ['arithmetic','word_sorting','boolean_expressions',"
        "'counting','reverse']}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {n: generate(n, 30, 7) for n in CHECKERS}


# --------------------------------------------------------------------------- through the composed config


@pytest.mark.parametrize(
    ("task", "prefix"),
    [
        ("arithmetic", "Compute: "),
        ("word_sorting", "Sort these words: "),
        ("boolean_expressions", "Evaluate: "),
        ("counting", "Count: "),
    ],
)
def test_synthetic_task_renders_correct_targets(run_dir, task, prefix):
    cfg = compose_train([f"data.tasks.{task}.source.num_examples=60"], run_dir=run_dir)
    splits = load_task(task, cfg.data.tasks[task], seed=int(cfg.data.seed))
    rows = splits.train.to_list() + splits.eval.to_list()
    assert len(rows) == 60
    assert len(splits.eval) == round(60 * float(cfg.data.tasks[task].eval.fraction))
    for r in rows:
        assert r["prompt"].startswith(prefix) and r["prompt"].endswith("\nAnswer:"), r
        question = r["prompt"][len(prefix) : -len("\nAnswer:")]
        assert r["target"] == " " + CHECKERS[task](question), r
    train_q = {r["prompt"] for r in splits.train}
    assert not train_q & {r["prompt"] for r in splits.eval}
