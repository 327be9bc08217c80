"""Data that used to be cut or read silently, or fail with an error that names no file or row: prompts
longer than ``model.max_seq_len``, bad bytes and lines in task files, empty files, torn templates."""

from __future__ import annotations

import logging

import pytest

from mtlora.data import build_data
from mtlora.data.tasks import load_task
from mtlora.errors import ConfigError
from mtlora.models import build_tokenizer
from tests.helpers.compose import compose_train


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
