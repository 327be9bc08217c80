"""scripts/crosscheck_lmeval.py: the comparison and the lm-eval task directory (lm-eval only where needed)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def xc():
    return load_script("crosscheck_lmeval")


def _rec(prompt="Q: x\nA:", gen=" True", ext=" True", correct=False):
    return {"prompt": prompt, "generation": gen, "extracted": ext, "correct": correct}


def test_compare_identical(xc):
    ours = {"navigate/0": _rec(), "navigate/1": _rec(gen="No", ext="No", correct=True)}
    rep = xc.compare_records(ours, json.loads(json.dumps(ours)))
    assert rep["agree"] and rep["n_disagreements"] == 0
    assert rep["totals"]["compared"] == 2 and rep["totals"]["all_same"] == 2
    assert rep["totals"]["correct_ours"] == rep["totals"]["correct_lmeval"] == 1
    assert rep["tasks"]["navigate"]["same_prompt"] == 2


def test_compare_counts_each_field_and_locates_prompt_difference(xc):
    ours = {
        "a/0": _rec(prompt="Q: x\nA: Let's think step by step."),
        "a/1": _rec(),
        "b/10": _rec(gen="(A)", ext="(A)", correct=True),
        "b/2": _rec(),
    }
    theirs = {
        "a/0": _rec(prompt="Q: x\nA: Let's think step by step.\n"),
        "a/1": _rec(gen=" True\n", ext=" True"),
        "b/10": _rec(gen="(A)", ext="(A)", correct=1.0),  # lm-eval's exact_match is a float
        "c/0": _rec(),
    }
    rep = xc.compare_records(ours, theirs)
    t = rep["totals"]
    assert t["compared"] == 3 and t["same_prompt"] == 2 and t["same_generation"] == 2
    assert t["same_extracted"] == 3 and t["same_correct"] == 3 and t["all_same"] == 1
    assert not rep["agree"] and rep["n_disagreements"] == 2
    assert rep["only_ours"] == ["b/2"] and rep["only_lmeval"] == ["c/0"]
    d0 = rep["disagreements"][0]
    assert d0["id"] == "a/0" and d0["differs"] == ["prompt"]
    assert d0["prompt"]["first_diff_at"] == len("Q: x\nA: Let's think step by step.")
    assert d0["prompt"]["len_lmeval"] == d0["prompt"]["len_ours"] + 1
    assert rep["disagreements"][1]["generation"] == {"ours": " True", "lmeval": " True\n"}
    table = xc.format_table(rep)
    assert "| **total** | 3 | 2 | 2 | 3 | 3 | 1 |" in table


def test_records_from_lmeval_samples(xc):
    samples = [
        {
            "doc_id": 3,
            "arguments": [["PROMPT", {"until": ["Q"]}]],
            "resps": [["gen text"]],
            "filtered_resps": ["gen"],
            "target": "gen",
            "exact_match": 1.0,
        }
    ]
    recs = xc.records_from_lmeval_samples(samples, "web_of_lies")
    assert recs == {
        "web_of_lies/3": {
            "prompt": "PROMPT",
            "generation": "gen text",
            "extracted": "gen",
            "target": "gen",
            "correct": True,
        }
    }


def test_records_from_ours_checks_prompt_hash(xc, tmp_path):
    import hashlib

    line = {
        "id": "navigate/0",
        "prompt_sha1": hashlib.sha1(b"P").hexdigest(),
        "generation": "g",
        "extracted": "g",
        "target": "Yes",
        "correct": False,
    }
    (tmp_path / "navigate.jsonl").write_text(json.dumps(line) + "\n")
    recs = xc.records_from_ours(tmp_path, ["navigate"], {"navigate/0": "P"})
    assert recs["navigate/0"]["prompt"] == "P"
    with pytest.raises(RuntimeError, match="prompt_sha1"):
        xc.records_from_ours(tmp_path, ["navigate"], {"navigate/0": "other"})


def test_task_dir_includes_lmeval_yaml(xc, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'mtlora[crosscheck]')")
    from lm_eval.tasks._yaml_loader import load_yaml

    data = tmp_path / "bbh"
    data.mkdir()
    (data / "navigate.json").write_text(json.dumps({"examples": [{"input": "i", "target": "Yes"}]}))
    names = xc.write_task_dir(tmp_path / "tasks", ["navigate"], "lmeval_cot_fewshot", data)
    cfg = load_yaml(tmp_path / "tasks" / f"{names['navigate']}.yaml")
    assert cfg["task"] == "mtlora_xc_cot_fewshot_navigate"
    assert cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(data / "navigate.json")}, "field": "examples"}
    # everything else is lm-eval's own: prompt template, stop strings, filters
    assert cfg["doc_to_text"].startswith("Q: {{input}}\nA: Let's think step by step.")
    assert cfg["generation_kwargs"]["until"] == ["</s>", "Q", "\n\n"]
    assert cfg["filter_list"][0]["filter"][0]["regex_pattern"] == "(?<=the answer is )(.*)(?=.)"
    assert len(cfg["fewshot_config"]["samples"]) == 3
