"""Data that used to be cut or read silently, or fail with an error that names no file or row: prompts
longer than ``model.max_seq_len``, bad bytes and lines in task files, empty files, torn templates."""

from __future__ import annotations

import json
import logging

import pytest

from mtlora.data import build_data
from mtlora.data.tasks import load_task
from mtlora.errors import ConfigError, DataError
from mtlora.models import build_tokenizer
from tests.helpers.compose import DATA_DIR, compose_train

TEMPLATES = DATA_DIR / "flan" / "flan_v2_templates.json"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(compose_train([]).model)


def test_rows_cut_to_max_seq_len_are_counted_and_warned(tok, caplog) -> None:
    """word_sorting rows hold up to ~100 byte tokens: at 64, most are cut and a sixth lose most of their prompt."""
    cfg = compose_train(["data.select=[word_sorting]"])
    with caplog.at_level(logging.WARNING, logger="mtlora.data.build"):
        data = build_data(cfg.data, tok, 64)
    splits = load_task(
        "word_sorting", cfg.data.tasks.word_sorting, seed=int(cfg.data.seed), on_bad_row="error"
    )
    n_tok = [
        len(tok(r["prompt"] + r["target"], add_special_tokens=False)["input_ids"]) + 1 for r in splits.train
    ]
    longer = sum(n > 64 for n in n_tok)  # prompt + answer + EOS over the limit
    ds = data.train[0]
    msg = [r.getMessage() for r in caplog.records if "train rows are longer" in r.getMessage()]
    assert len(msg) == 1 and "task 'word_sorting'" in msg[0] and "model.max_seq_len=64" in msg[0]
    assert f"{longer} of {len(ds)} train rows" in msg[0] and longer > len(ds) // 2


def test_a_task_that_loses_its_prompts_is_refused(tok) -> None:
    cfg = compose_train(["model.max_seq_len=16"])
    with pytest.raises(
        ConfigError, match=r"model.max_seq_len=16: \d+ of \d+ train rows of task '\w+' lose more"
    ):
        build_data(cfg.data, tok, 16)


def test_truncation_report_counts_against_an_independent_count(tok) -> None:
    """Prompt tokens of the byte tokenizer are bytes: a row keeps ``L - len(target) - 1`` of them."""
    import datasets

    from mtlora.data.collate import tokenize_examples, truncation_report

    rows = [
        {"prompt": "a" * 10, "target": " b"},  # 10 + 2 + 1 = 13 tokens: fits in 16
        {"prompt": "a" * 20, "target": " b"},  # keeps 13 of 20: cut, not lost
        {"prompt": "a" * 40, "target": " b"},  # keeps 13 of 40: lost
        {"prompt": "a", "target": " " + "b" * 30},  # answer cut
    ]
    ds = tokenize_examples(datasets.Dataset.from_list(rows), tok, 16)
    assert ds["prompt_cut"] == [0, 7, 27, 0] and ds["target_cut"][:3] == [0, 0, 0] and ds["target_cut"][3] > 0
    assert truncation_report(ds) == {"rows": 4, "cut": 3, "prompt_lost": 1, "target_cut": 1}


def _dolly(path, *extra):
    return compose_train(
        ["data=dolly", "data.source.type=json", f"+data.source.data_files={path}", *extra]
    ).data


def _rows(n: int) -> list[bytes]:
    return [
        json.dumps(
            {"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "open_qa"}
        ).encode()
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            b'{"instruction": "caf\xe9", "response": "x", "category": "open_qa"}',
            r"line 3 \(column 21\) is not valid UTF-8",
        ),
        (b'{"instruction": "q", "response": "x", "category": "open_qa"', r"line 3 is not a JSON object"),
        (b"[1, 2]", r"line 3 is not a JSON object \(a JSON list"),
    ],
)
def test_a_bad_jsonl_line_names_file_and_line_or_is_skipped(tmp_path, bad: bytes, message: str) -> None:
    rows = _rows(20)
    f = tmp_path / "dolly.jsonl"
    f.write_bytes(b"\n".join([*rows[:2], bad, *rows[2:]]) + b"\n")
    with pytest.raises(DataError, match=rf"{f}: {message}"):
        load_task("open_qa", _dolly(f).tasks.open_qa, seed=0)
    splits = load_task("open_qa", _dolly(f, "data.on_bad_row=skip").tasks.open_qa, seed=0, on_bad_row="skip")
    assert splits.skipped_rows == 1 and len(splits.train) + len(splits.eval) == 20


@pytest.mark.parametrize(("kind", "name"), [("json", "empty.jsonl"), ("csv", "empty.csv")])
def test_an_empty_task_file_says_so(tmp_path, kind: str, name: str) -> None:
    f = tmp_path / name
    f.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{f}: the file holds no rows \(empty\)"):
        load_task("open_qa", _dolly(f, f"data.source.type={kind}").tasks.open_qa, seed=0)


def test_a_truncated_flan_template_file_names_file_and_line(tmp_path) -> None:
    good = TEMPLATES.read_bytes()
    f = tmp_path / "templates.json"
    f.write_bytes(good[: len(good) // 2])
    cfg = compose_train(["data=flan_cot"]).data
    name = next(iter(cfg.tasks))
    task = cfg.tasks[name]
    task.template.file = str(f)
    with pytest.raises(DataError, match=rf"Flan template file {f}: not valid JSON at line \d+, column \d+"):
        load_task(name, task, seed=0)
