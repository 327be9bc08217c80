"""Generation suites end to end: ``heldin_gen`` on tiny trained runs (standalone evaluation and the
end-of-training hook, plain and task-aware adapters) and ``mmlu`` on a fake Hendrycks-layout dataset."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from mtlora.config import validate_config
from mtlora.errors import ConfigError, DataError
from mtlora.eval import generate, heldin_gen, mmlu, scoring
from mtlora.evaluate import evaluate
from mtlora.models import build_model, build_tokenizer
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import load_run
from tests.helpers.compose import compose_train
from tests.helpers.training import SHORT_RUN

BASE = [o for o in SHORT_RUN if not o.startswith("eval=")] + ["train.max_steps=3"]
TASK_METRICS = {
    "arithmetic": "number",
    "word_sorting": "exact",
    "boolean_expressions": "exact",
    "counting": "number",
}


def _train(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    """What ``python -m mtlora.train`` does around the loop: resolved config, train, COMPLETED."""
    d = tmp_path / name
    d.mkdir()
    cfg = compose_train(overrides, run_dir=d)
    validate_config(cfg)
    save_resolved_config(cfg, d)
    run_training(cfg, d)
    finish(d, True)
    return d


@torch.no_grad()
def _greedy_forward(model, tok, prompt: str, n_new: int, task_id: int | None = None) -> str:
    """Reference decode: full forward per token, one row, no cache, optional task id."""
    ids, out = tok(prompt)["input_ids"], []
    for _ in range(n_new):
        if task_id is not None:
            model.adapter_context.begin(task_ids=torch.tensor([task_id]))
        t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_heldin_gen_standalone_outputs_and_scores(tmp_path: Path) -> None:
    run = _train(tmp_path, "run", [*BASE, "eval=none"])
    cfg = compose_train(["eval=heldin_gen", "eval.suites=[heldin_gen]", "eval.heldin_gen.limit=4"])
    cfg.eval.heldin_gen.max_new_tokens = 6
    res = evaluate(cfg, {"run_dir": str(run), "device": "cpu"})["heldin_gen"]
    m = json.loads((run / "metrics" / "eval_heldin_gen.json").read_text())
    assert m == json.loads(json.dumps(res))
    assert list(m["tasks"]) == list(TASK_METRICS)
    assert {t: r["metric"] for t, r in m["tasks"].items()} == TASK_METRICS
    assert all(r["n"] == 4 for r in m["tasks"].values()) and m["micro"]["n"] == 16
    assert "unweighted mean over tasks" in m["macro"]["label"] and "pooled" in m["micro"]["label"]
    assert m["settings"]["limit"] == 4 and m["settings"]["max_new_tokens"] == 6
    rows = list(csv.DictReader((run / "metrics" / "eval_heldin_gen.csv").open()))
    assert [r["task"] for r in rows] == [*TASK_METRICS, "macro", "micro"]
    assert rows[0]["metric"] == "number" and float(rows[-2]["score"]) == pytest.approx(m["macro"]["score"])
    md = (run / "metrics" / "eval_heldin_gen.md").read_text()
    assert "| arithmetic | number | 4 |" in md and "| macro |" in md and "| micro |" in md

    model, tok = load_run(run)
    scores = []
    for t, task in enumerate(TASK_METRICS):
        lines = _lines(run / "predictions" / "heldin_gen" / f"{task}.jsonl")
        assert [x["id"] for x in lines] == [f"{task}/{i}" for i in range(4)]
        assert all(x["task_id"] == t for x in lines)
        for x in lines:  # each row's verdict is the metric recomputed
            ok, v = scoring.score(TASK_METRICS[task], x["generation"], x["target"])
            assert (x["correct"], x["score"]) == (ok, v)
            assert x["extracted"] == scoring.extract(TASK_METRICS[task], x["generation"])
            scores.append(v)
        assert m["tasks"][task]["correct"] == sum(x["correct"] for x in lines)
    assert m["micro"]["score"] == pytest.approx(sum(scores) / len(scores))
    assert m["macro"]["score"] == pytest.approx(sum(r["score"] for r in m["tasks"].values()) / 4)
    # the generation is the plain greedy decode of the training prompt (target = " <answer>")
    cfg_run = compose_train(BASE, run_dir=run)
    from mtlora.data import build_data

    data = build_data(cfg_run.data, tok, int(cfg_run.model.max_seq_len))
    first = _lines(run / "predictions" / "heldin_gen" / "counting.jsonl")[1]
    row = data.eval[3][1]
    assert first["target"] == row["target"]
    assert first["generation"] == _greedy_forward(model, tok, row["prompt"], 6)


def test_end_of_training_hook_passes_task_ids(tmp_path: Path, monkeypatch) -> None:
    seen: dict = {}
    real = generate.greedy_generate

    def spy(model, tok, prompts, max_new_tokens, **kw):
        if kw.get("desc") == "heldin_gen":  # not the held-in samples generated before it
            seen["prompts"], seen["task_ids"] = list(prompts), kw["task_ids"]
        return real(model, tok, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(generate, "greedy_generate", spy)
    over = [
        *BASE,
        "adapter=mtl_lora",
        "eval=heldin_gen",
        "eval.suites=[heldin_gen]",
        "eval.heldin_gen.limit=2",
    ]
    run = _train(tmp_path, "mtl", [*over, "eval.heldin_gen.max_new_tokens=4"])
    assert seen["task_ids"] == [0, 0, 1, 1, 2, 2, 3, 3]  # one id per row: its training task
    m = json.loads((run / "metrics" / "eval_heldin_gen.json").read_text())
    assert m["micro"]["n"] == 8 and not (run / "metrics" / "eval_heldin.json").exists()
    model, tok = load_run(run)
    assert any(getattr(x, "needs_task_ids", False) for x in model.modules())
    for task, t in (("counting", 3), ("boolean_expressions", 2)):
        x = _lines(run / "predictions" / "heldin_gen" / f"{task}.jsonl")[0]
        prompt = seen["prompts"][2 * t]
        assert x["task_id"] == t and x["prompt"] == prompt
        assert x["prompt_sha1"] == hashlib.sha1(prompt.encode()).hexdigest()
        assert x["generation"] == _greedy_forward(model, tok, prompt, 4, task_id=t)


def test_every_run_ends_with_a_few_greedy_samples_per_task(tmp_path: Path) -> None:
    """eval.samples: the first per_task held-out rows of every task, greedy-decoded with the row's task id
    (task-aware MTL-LoRA here) and read with the task's metric, in predictions/heldin_samples/<task>.jsonl."""
    over = [*BASE, "adapter=mtl_lora", "eval=default", "eval.samples.per_task=2"]
    run = _train(tmp_path, "run", [*over, "eval.samples.max_new_tokens=5"])
    model, tok = load_run(run)
    from mtlora.data import build_data

    cfg = compose_train(over, run_dir=run)
    data = build_data(cfg.data, tok, int(cfg.model.max_seq_len))
    assert sorted(p.name for p in (run / "predictions" / "heldin_samples").iterdir()) == sorted(
        f"{t}.jsonl" for t in TASK_METRICS
    )
    for t, (task, metric) in enumerate(TASK_METRICS.items()):
        lines = _lines(run / "predictions" / "heldin_samples" / f"{task}.jsonl")
        assert [x["id"] for x in lines] == [f"{task}/0", f"{task}/1"]
        for i, x in enumerate(lines):
            row = data.eval[t][i]
            assert (x["task"], x["prompt"], x["target"]) == (task, row["prompt"], row["target"])
            assert x["generation"] == _greedy_forward(model, tok, row["prompt"], 5, task_id=t)
            assert x["extracted"] == scoring.extract(metric, x["generation"])
            assert (x["correct"], x["score"]) == scoring.score(metric, x["generation"], x["target"])
    # per_task=0 writes none
    run0 = _train(tmp_path, "off", [*BASE, "eval=default", "eval.samples.per_task=0"])
    assert (run0 / "metrics" / "eval_heldin.json").exists() and not (run0 / "predictions").exists()


def test_heldin_gen_config_rules(tmp_path: Path) -> None:
    validate_config(compose_train(["eval=heldin_gen"], run_dir=tmp_path))
    for bad, key in (
        ("data.tasks.arithmetic.eval.metric=bleu", "data.tasks.arithmetic.eval.metric"),
        ("eval.heldin_gen.max_new_tokens=0", "eval.heldin_gen.max_new_tokens"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate_config(compose_train(["eval=heldin_gen", bad], run_dir=tmp_path))
    with pytest.raises(ConfigError, match="eval.heldin_gen: unknown key"):
        heldin_gen.resolve_settings({"limt": 3}, heldin_gen.DEFAULTS, "eval.heldin_gen")


# ----------------------------------------------------------------------------------------------- MMLU
SUBJ = {"anatomy": ["B", "A", "B"], "virology": ["C", "C", "D"]}


def _fake_mmlu(root: Path) -> Path:
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    for s, answers in SUBJ.items():
        with (root / "dev" / f"{s}_dev.csv").open("w", newline="") as f:
            w = csv.writer(f)
            for i in range(5):
                w.writerow([f"{s} dev q{i}, with comma?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]])
        with (root / "test" / f"{s}_test.csv").open("w", newline="") as f:
            csv.writer(f).writerows(
                [[f"{s} test q{i}", "w", "x", "y", "z", a] for i, a in enumerate(answers)]
            )
    return root


def test_mmlu_prompt_scoring_and_outputs(tmp_path: Path, monkeypatch) -> None:
    root = _fake_mmlu(tmp_path / "mmlu_data")
    dev, test = mmlu.load_subject("anatomy", root)
    assert len(dev) == 5 and test[0] == {
        "question": "anatomy test q0",
        "choices": ["w", "x", "y", "z"],
        "answer": "B",
    }
    demos = "".join(
        f"Question: anatomy dev q{i}, with comma?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
        for i in range(5)
    )
    expected = demos + "Question: anatomy test q0\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    assert mmlu.build_prompt(dev, test[0], 5) == expected

    seen = {}

    def fake(model, tok, prompts, max_new_tokens, **kw):  # always " B" -> anatomy 2/3, virology 0/3
        seen["prompts"], seen["task_ids"] = list(prompts), kw["task_ids"]
        return [" B\n"] * len(prompts)

    monkeypatch.setattr(generate, "greedy_generate", fake)
    m = mmlu.run_mmlu(
        torch.nn.Linear(1, 1), None, {"data_dir": str(root), "subjects": list(SUBJ)}, tmp_path, progress=False
    )
    assert seen["prompts"][0] == expected and seen["task_ids"] is None  # plain model: no task ids
    assert (
        m["tasks"]["anatomy"]["accuracy"] == pytest.approx(2 / 3) and m["tasks"]["virology"]["correct"] == 0
    )
    assert m["macro"]["accuracy"] == pytest.approx(1 / 3) and m["micro"]["accuracy"] == pytest.approx(2 / 6)
    assert m["groups"] == {"category:other": {"n": 6, "accuracy": pytest.approx(1 / 3), "n_subjects": 2}}
    assert "mtLoRA" in m["micro"]["label"]
    lines = _lines(tmp_path / "predictions" / "mmlu" / "anatomy.jsonl")
    assert [(x["id"], x["extracted"], x["target"], x["correct"]) for x in lines] == [
        ("anatomy/0", "B", "B", True),
        ("anatomy/1", "B", "A", False),
        ("anatomy/2", "B", "B", True),
    ]
    rows = list(csv.DictReader((tmp_path / "metrics" / "eval_mmlu.csv").open()))
    assert [r["task"] for r in rows] == ["anatomy", "virology", "macro", "micro", "category:other"]
    assert "| anatomy | other | 3 | 2 |" in (tmp_path / "metrics" / "eval_mmlu.md").read_text()
    assert mmlu.extract("  ") == "X" and mmlu.extract("\nC.") == "C"

    # the real tiny model through the same path (2 tokens: the byte tokenizer emits the space first)
    monkeypatch.undo()
    cfg = compose_train([])
    model, tok = build_model(cfg.model).eval(), build_tokenizer(cfg.model)
    out = tmp_path / "real"
    r = mmlu.run_mmlu(
        model,
        tok,
        {"data_dir": str(root), "subjects": ["virology"], "limit": 2, "max_new_tokens": 2},
        out,
        progress=False,
    )
    x = _lines(out / "predictions" / "mmlu" / "virology.jsonl")[1]
    assert r["micro"]["n"] == 2 and x["extracted"] == mmlu.extract(x["generation"])
    assert x["correct"] == (x["extracted"] == "C")
    assert x["generation"] == _greedy_forward(
        model,
        tok,
        mmlu.build_prompt(
            *mmlu.load_subject("virology", root)[:1],
            {"question": "virology test q1", "choices": ["w", "x", "y", "z"]},
        ),
        2,
    )


def test_mmlu_missing_data_names_path_env_and_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MTLORA_DATA_DIR", str(tmp_path / "nowhere"))
    validate_config(compose_train(["eval=mmlu"], run_dir=tmp_path))  # the default dir is checked at run time
    with pytest.raises(ConfigError) as e:  # an explicit one by validation, before training starts
        validate_config(compose_train(["eval=mmlu", f"eval.mmlu.data_dir={tmp_path / 'nowhere' / 'mmlu'}"]))
    with pytest.raises(DataError) as e2:
        mmlu.run_mmlu(torch.nn.Linear(1, 1), None, {"subjects": ["anatomy"]}, tmp_path, progress=False)
    for msg in (str(e.value), str(e2.value)):
        assert str(tmp_path / "nowhere" / "mmlu") in msg and "MTLORA_DATA_DIR" in msg and "cais/mmlu" in msg
    with pytest.raises(DataError, match=str(tmp_path / "elsewhere")):
        mmlu.load_subject("anatomy", tmp_path / "elsewhere")
    root = _fake_mmlu(tmp_path / "partial")
    with pytest.raises(DataError, match=r"test/astronomy_test.csv|dev/astronomy_dev.csv"):
        mmlu.load_subject("astronomy", root)  # a subject whose files are missing: the file path
    with pytest.raises(ConfigError, match="unknown MMLU subject 'anatomi'"):
        mmlu.load_subject("anatomi", root)
    with pytest.raises(ConfigError, match="eval.mmlu.shots"):
        validate_config(compose_train(["eval=mmlu", f"eval.mmlu.data_dir={root}", "eval.mmlu.shots=6"]))
