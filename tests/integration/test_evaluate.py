"""BBH end to end: a tiny trained run evaluated by ``python -m mtlora.evaluate run_dir=R eval=bbh``, the
end-of-training ``eval=bbh`` hook, the outputs (json / csv / md / predictions), scoring, task-id policy and
the missing-data error."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
import torch

from mtlora.config import validate_config
from mtlora.errors import ConfigError, DataError
from mtlora.eval import bbh, generate
from mtlora.eval.bbh_suite import resolve_settings, resolve_task_id, run_bbh
from mtlora.models import build_model, build_tokenizer
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import load_run
from tests.helpers.compose import CONF, REPO, compose_train, run_module
from tests.helpers.training import SHORT_RUN

TASKS = ["navigate", "snarks", "word_sorting"]  # binary, multiple choice, free text
#: prompts cut to this many tokens (bytes) in the end-to-end test: the 3-shot prompts hold 500-1300, and
#: generating after all of them on the CPU buys no coverage
PROMPT_TOKENS = 128
BASE = [o for o in SHORT_RUN if not o.startswith("eval=")] + ["train.max_steps=3"]


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
def _greedy_forward(model, tok, ids: list[int], n_new: int) -> str:
    out: list[int] = []
    for _ in range(n_new):
        t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)


def test_end_of_training_hook_then_evaluate_cli(tmp_path: Path) -> None:
    # training with eval=bbh runs the suite at the end (here protocol lmeval_fewshot, 1 example)
    over = [*BASE, "eval=bbh", "eval/bbh=lmeval_fewshot", "eval.bbh.limit=1", "eval.bbh.tasks=[navigate]"]
    over.append(f"eval.bbh.max_input_tokens={PROMPT_TOKENS}")
    run = _train(tmp_path, "run", [*over, "eval.bbh.max_new_tokens=4", "eval.max_examples_per_task=2"])
    m = json.loads((run / "metrics" / "eval_bbh_lmeval_fewshot.json").read_text())
    assert m["protocol"] == "lmeval_fewshot" and m["tasks"]["navigate"]["n"] == 1
    assert m["settings"]["stop"] == ["</s>", "Q", "\n\n"] and m["settings"]["max_new_tokens"] == 4
    assert (run / "predictions" / "bbh_lmeval_fewshot" / "navigate.jsonl").exists()
    assert (run / "metrics" / "eval_heldin.json").exists()  # eval=bbh keeps the held-in suite

    # standalone: python -m mtlora.evaluate run_dir=R eval=bbh (default protocol mtlora_direct)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = {p.relative_to(run) for p in run.rglob("*")}
    heldin_before = {x: (run / "metrics" / f"eval_heldin.{x}").read_text() for x in ("json", "md")}
    res = run_module(
        "mtlora.evaluate",
        ["eval=bbh", f"run_dir={run}", "eval.bbh.limit=2", f"eval.bbh.tasks=[{','.join(TASKS)}]"]
        + ["eval.max_examples_per_task=4", f"eval.bbh.max_input_tokens={PROMPT_TOKENS}"],
        cwd=cwd,  # outside the repo: the package comes from PYTHONPATH
        timeout=300,
        env={"PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "BBH mtlora_direct: macro" in res.stdout
    # nothing Hydra-related anywhere: only the eval outputs are new in the run dir, nothing in the cwd; the
    # training-time held-out results that eval=bbh's heldin suite replaces are kept in earlier_evals/<time>/
    new = {str(p.relative_to(run)) for p in run.rglob("*")} - {str(p) for p in before}
    (stamp,) = [p.name for p in (run / "earlier_evals").iterdir()]
    earlier = f"earlier_evals/{stamp}"
    for x, text in heldin_before.items():
        assert (run / earlier / "metrics" / f"eval_heldin.{x}").read_text() == text
    assert {p for p in new if p.startswith("earlier_evals")} == {
        "earlier_evals",
        earlier,
        f"{earlier}/metrics",
        f"{earlier}/metrics/eval_heldin.json",
        f"{earlier}/metrics/eval_heldin.md",
    }
    assert {p for p in new if not p.startswith("earlier_evals")} == {
        *(f"metrics/eval_bbh_mtlora_direct.{ext}" for ext in ("json", "csv", "md")),
        "predictions/bbh_mtlora_direct",
        *(f"predictions/bbh_mtlora_direct/{t}.jsonl" for t in TASKS),
    }
    assert list(cwd.iterdir()) == []

    m = json.loads((run / "metrics" / "eval_bbh_mtlora_direct.json").read_text())
    assert m["protocol"] == "mtlora_direct" and list(m["tasks"]) == TASKS
    assert all(t["n"] == 2 for t in m["tasks"].values())
    assert "papers" in m["macro"]["label"] and "lm-eval" in m["micro"]["label"] and m["micro"]["n"] == 6
    assert m["settings"]["max_new_tokens"] == 32 and m["settings"]["limit"] == 2
    assert m["settings"]["max_input_tokens"] == PROMPT_TOKENS and m["settings"]["truncation_side"] == "right"
    assert json.loads((run / "metrics" / "eval_heldin.json").read_text())["suite"] == "heldin"
    rows = list(csv.DictReader((run / "metrics" / "eval_bbh_mtlora_direct.csv").open()))
    assert [r["task"] for r in rows] == [*TASKS, "macro", "micro"]
    md = (run / "metrics" / "eval_bbh_mtlora_direct.md").read_text()
    assert "| navigate | 2 |" in md and "| macro |" in md and "| micro |" in md

    model, tok = load_run(run)
    for task in TASKS:
        _, examples = bbh.load_task(task, protocol="mtlora_direct")
        lines = [json.loads(x) for x in (run / "predictions" / "bbh_mtlora_direct" / f"{task}.jsonl").open()]
        assert [x["id"] for x in lines] == [f"{task}/3", f"{task}/4"]  # demos = examples 0..2
        correct = []
        for x, ex in zip(lines, examples):
            assert x["prompt"] == bbh.build_prompt(
                "mtlora_direct", task, ex["input"]
            )  # the text, not only its hash
            assert x["prompt_sha1"] == hashlib.sha1(x["prompt"].encode()).hexdigest()
            assert x["target"] == ex["target"]
            assert x["correct"] == bbh.score("mtlora_direct", task, x["generation"], x["target"])
            assert x["extracted"] == bbh.extract("mtlora_direct", task, x["generation"])
            correct.append(x["correct"])
        assert m["tasks"][task]["correct"] == sum(correct)
    # the saved generation is the forward-pass greedy decode of the loaded run (no cache, no batching) on
    # the prompt's first PROMPT_TOKENS tokens (mtlora_direct cuts on the right; the byte tokenizer adds no
    # special tokens)
    x = json.loads((run / "predictions" / "bbh_mtlora_direct" / "navigate.jsonl").open().readline())
    prompt = bbh.build_prompt("mtlora_direct", "navigate", bbh.load_task("navigate")[1][0]["input"])
    ids = tok(prompt)["input_ids"]
    assert len(ids) > PROMPT_TOKENS and tok(prompt, add_special_tokens=False)["input_ids"] == ids
    assert x["generation"] == _greedy_forward(model, tok, ids[:PROMPT_TOKENS], 32)


def test_lmeval_presets_cut_prompts_to_the_model_length_and_refuse_no_room(tmp_path: Path) -> None:
    """lm-eval's HF model feeds the last ``max_length - max_gen_toks`` ids of each encoded prompt, where
    ``max_length`` is the config's ``max_position_embeddings`` (512 for the tiny model) and ``max_gen_toks``
    256 for bbh_fewshot; with ``max_gen_toks >= max_length`` (bbh_cot_fewshot's 1024) it refuses to run."""
    cfg = compose_train([], run_dir=tmp_path)
    tok, model = build_tokenizer(cfg.model), build_model(cfg.model).eval()
    room = int(model.config.max_position_embeddings) - 256
    assert room == 256
    tasks = ["navigate", "date_understanding"]
    prompts = [
        bbh.build_prompt("lmeval_fewshot", t, ex["input"])
        for t in tasks
        for ex in bbh.load_task(t, protocol="lmeval_fewshot")[1][:2]
    ]
    full = [tok(p)["input_ids"] for p in prompts]
    assert all(len(x) > room for x in full)  # every prompt is cut
    seen: list[list[int]] = []

    def first_step(m, args, kw):
        if kw["input_ids"].shape[1] > 1:  # the prompt step (later steps feed one token per row)
            seen.extend(r[k.bool()].tolist() for r, k in zip(kw["input_ids"], kw["attention_mask"]))

    hook = model.register_forward_pre_hook(first_step, with_kwargs=True)
    try:
        m = run_bbh(
            model, tok, {"protocol": "lmeval_fewshot", "tasks": tasks, "limit": 2}, tmp_path, progress=False
        )
    finally:
        hook.remove()
    assert sorted(seen) == sorted(x[-room:] for x in full)
    assert m["settings"]["max_input_tokens"] == room and m["settings"]["model_max_length"] == 512
    assert m["truncated_prompts"] == len(prompts)
    # the generation is the greedy continuation of the kept ids, cut at the stop strings
    line = json.loads((tmp_path / "predictions" / "bbh_lmeval_fewshot" / "navigate.jsonl").open().readline())
    ids, out = full[0][-room:], []
    with torch.no_grad():
        for _ in range(256):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == tok.eos_token_id:
                break
            out.append(t)
            if any(x in tok.decode(out, skip_special_tokens=True) for x in ("</s>", "Q", "\n\n")):
                break
    text = tok.decode(out, skip_special_tokens=True)
    assert line["generation"] == bbh.truncate_at_stop(text, ("</s>", "Q", "\n\n"))

    # bbh_cot_fewshot's 1024 new tokens on a 512-position model: refused before any generation
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match=r"model max length 512 .*eval.bbh.max_new_tokens=1024"):
            run_bbh(model, tok, {"protocol": "lmeval_cot_fewshot", "tasks": tasks, "limit": 1}, tmp_path)
        with pytest.raises(ConfigError, match="model max length 300"):  # lm-eval's max_length model arg
            run_bbh(
                model,
                tok,
                {"protocol": "lmeval_fewshot", "model_max_length": 300, "max_new_tokens": 300},
                tmp_path,
            )
    finally:
        hook.remove()
    assert not calls
    with pytest.raises(ConfigError, match=r"model max length 512 .*eval.bbh.max_new_tokens=1024"):
        validate_config(compose_train(["eval=bbh", "eval/bbh=lmeval_cot_fewshot"], run_dir=tmp_path))
    for ok in (
        "eval.bbh.max_new_tokens=511",
        "eval.bbh.model_max_length=2048",
        "eval.bbh.max_input_tokens=0",
    ):
        validate_config(compose_train(["eval=bbh", "eval/bbh=lmeval_cot_fewshot", ok], run_dir=tmp_path))


def test_scores_and_macro_micro_from_known_generations(tmp_path: Path, monkeypatch) -> None:
    # generations replaced by the target for snarks and by nonsense for navigate: 100 % and 0 %
    def fake(model, tok, prompts, max_new_tokens, **kw):
        return [
            next(e["target"] for e in ex if e["input"] in p) if "sarcastic" in p else "???" for p in prompts
        ]

    ex = bbh.load_task("snarks", protocol="lmeval_fewshot")[1][:3]
    monkeypatch.setattr(generate, "greedy_generate", fake)
    cfg = {"protocol": "lmeval_fewshot", "tasks": ["snarks", "navigate"], "limit": 3}
    m = run_bbh(torch.nn.Linear(1, 1), None, cfg, tmp_path, progress=False)
    assert m["tasks"]["snarks"]["accuracy"] == 1.0 and m["tasks"]["navigate"]["accuracy"] == 0.0
    assert m["macro"]["accuracy"] == 0.5 and m["micro"]["accuracy"] == 0.5
    lines = [json.loads(x) for x in (tmp_path / "predictions" / "bbh_lmeval_fewshot" / "snarks.jsonl").open()]
    assert [x["correct"] for x in lines] == [True] * 3 and lines[0]["target"] == ex[0]["target"]


def test_missing_data_dir_names_path_env_and_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MTLORA_DATA_DIR", str(tmp_path / "nowhere"))
    cfg = compose_train(["eval=bbh"], run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:  # caught by validation, before training starts
        validate_config(cfg)
    with pytest.raises(DataError) as e2:
        run_bbh(torch.nn.Linear(1, 1), None, {"tasks": ["navigate"]}, tmp_path, progress=False)
    for msg in (str(e.value), str(e2.value)):
        assert str(tmp_path / "nowhere" / "bbh") in msg and "MTLORA_DATA_DIR" in msg and "lukaemon/bbh" in msg
    with pytest.raises(ConfigError, match="unknown BBH task 'navigat'"):
        resolve_settings({"tasks": ["navigat"]})
    # eval.bbh.data_dir=hub: mtlora_direct needs no local files; the others still need the prompt files
    validate_config(compose_train(["eval=bbh", "eval.bbh.data_dir=hub"], run_dir=tmp_path))
    with pytest.raises(ConfigError, match="has no prompt files"):
        validate_config(
            compose_train(["eval=bbh", "eval.bbh.data_dir=hub", "eval/bbh=lmeval_fewshot"], run_dir=tmp_path)
        )


def test_task_id_policy_for_task_aware_adapters(tmp_path: Path) -> None:
    from mtlora.adapters import inject_adapters

    cfg = compose_train(["adapter=mtl_lora"], run_dir=tmp_path)
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    names = list(cfg.data.tasks)
    with pytest.raises(ConfigError, match="eval.bbh.task_id=null"):
        resolve_task_id(model, None, names)
    assert resolve_task_id(model, names[1], names) == 1 and resolve_task_id(model, 0, names) == 0
    with pytest.raises(ConfigError):
        resolve_task_id(model, len(names), names)
    assert resolve_task_id(build_model(cfg.model), None, names) is None  # plain model: no task ids


def test_protocol_presets_match_the_library_and_validate(tmp_path: Path) -> None:
    presets = sorted(p.stem for p in (CONF / "eval" / "bbh").glob("*.yaml"))
    assert presets == sorted(bbh.PROTOCOLS)
    for name in presets:
        # lmeval_cot_fewshot's 1024 new tokens exceed the tiny model's 512 positions: refused unless longer
        more = ["eval.bbh.model_max_length=4096"] if name == "lmeval_cot_fewshot" else []
        cfg = compose_train(["eval=bbh", f"eval/bbh={name}", *more], run_dir=tmp_path)
        validate_config(cfg)
        dec = bbh.PROTOCOLS[name].decode
        assert cfg.eval.bbh.protocol == name and cfg.eval.bbh.max_new_tokens == dec.max_new_tokens
        assert list(cfg.eval.bbh.stop) == list(dec.stop)
        settings = resolve_settings(cfg.eval.bbh)
        assert settings["max_input_tokens"] == dec.max_input_tokens
        assert settings["truncation_side"] == dec.truncation_side
    assert resolve_settings({"protocol": "align_lora"})["max_input_tokens"] == 2048
    assert resolve_settings({"protocol": "align_lora", "max_input_tokens": 0})["max_input_tokens"] is None
    for bad, key in (
        ("eval.bbh.truncation_side=middle", "eval.bbh.truncation_side"),
        ("eval.bbh.max_input_tokens=-1", "eval.bbh.max_input_tokens"),
        ("eval.bbh.max_input_tokens=all", "eval.bbh.max_input_tokens"),
        ("eval.bbh.model_max_length=0", "eval.bbh.model_max_length"),
        ("eval.bbh.protocol=nope", "eval.bbh.protocol"),
        ("eval.bbh.tasks=[nope]", "eval.bbh.tasks"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate_config(compose_train(["eval=bbh", bad], run_dir=tmp_path))
    assert build_tokenizer(cfg.model).padding_side == "right"  # generation pads left itself


def test_base_model_baseline_and_command_line_options(tmp_path: Path) -> None:
    from mtlora.evaluate import evaluate, split_argv

    argv, opts = split_argv(
        ["prog", "adapter=none", "model=tiny", "eval=bbh", f"out={tmp_path}", "run_dir=R"]
    )
    assert opts == {"adapter_none": True, "out": str(tmp_path), "run_dir": "R"}
    assert "adapter=none" not in argv and "model=tiny" in argv and "hydra.output_subdir=null" in argv
    cfg = compose_train(["eval=bbh", "eval.suites=[bbh]", "eval.bbh.tasks=[navigate]", "eval.bbh.limit=1"])
    res = evaluate(cfg, {"adapter_none": True, "out": str(tmp_path)})
    assert (
        res["bbh"]["micro"]["n"] == 1 and (tmp_path / "predictions/bbh_mtlora_direct/navigate.jsonl").exists()
    )
    with pytest.raises(ConfigError, match="out=DIR"):
        evaluate(cfg, {"adapter_none": True})
    with pytest.raises(ConfigError, match="eval.suites"):
        evaluate(compose_train(["eval=none"]), {"adapter_none": True, "out": str(tmp_path)})


def test_merge_of_a_task_aware_adapter_uses_the_eval_task_id(tmp_path: Path) -> None:
    """``eval.bbh.merge=true`` on MTL-LoRA folds in ΔW of ``eval.bbh.task_id`` and gives the unmerged
    predictions of that task; the weights are restored afterwards."""
    from mtlora.adapters import inject_adapters

    cfg = compose_train(["adapter=mtl_lora"], run_dir=tmp_path)
    tok, model = build_tokenizer(cfg.model), build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapter weights, so that the task id matters
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(cfg.data.tasks)
    base = {"tasks": ["navigate"], "limit": 2, "max_new_tokens": 6, "task_id": names[1]}
    runs = {}
    for merge in (False, True):
        out = tmp_path / f"merge_{merge}"
        run_bbh(model, tok, {**base, "merge": merge}, out, task_names=names, progress=False)
        runs[merge] = [
            json.loads(x)["generation"] for x in (out / "predictions/bbh_mtlora_direct/navigate.jsonl").open()
        ]
    assert runs[True] == runs[False]
    other = tmp_path / "other_task"
    run_bbh(model, tok, {**base, "task_id": names[0]}, other, task_names=names, progress=False)
    assert [
        json.loads(x)["generation"] for x in (other / "predictions/bbh_mtlora_direct/navigate.jsonl").open()
    ] != runs[False]
    assert all(
        torch.equal(v, before[k]) or torch.allclose(v, before[k], atol=1e-6)
        for k, v in model.state_dict().items()
    )


def test_a_later_evaluate_keeps_the_earlier_results(tmp_path: Path) -> None:
    """A second evaluation into the same dir moves the first one's outputs (metrics and predictions) to
    earlier_evals/<time they were written>/ instead of overwriting them; the dataset bars are off."""
    import datasets

    from mtlora.evaluate import evaluate

    cfg = compose_train(["eval=bbh", "eval.suites=[bbh]", "eval.bbh.tasks=[navigate]", "eval.bbh.limit=1"])
    cfg.eval.bbh.max_new_tokens = 2
    evaluate(cfg, {"adapter_none": True, "out": str(tmp_path)})
    first = {
        p.relative_to(tmp_path): p.read_text()
        for p in [*(tmp_path / "metrics").glob("eval_bbh_*"), *(tmp_path / "predictions").rglob("*.jsonl")]
    }
    assert len(first) == 4  # json, csv, md, predictions/bbh_mtlora_direct/navigate.jsonl
    written = dt.datetime.fromtimestamp(
        (tmp_path / "metrics" / "eval_bbh_mtlora_direct.json").stat().st_mtime
    )
    datasets.enable_progress_bars()
    evaluate(cfg, {"adapter_none": True, "out": str(tmp_path)})
    assert not datasets.is_progress_bar_enabled()
    earlier = tmp_path / "earlier_evals" / written.strftime("%Y-%m-%d_%H-%M-%S")
    assert [p.name for p in (tmp_path / "earlier_evals").iterdir()] == [earlier.name]
    for rel, text in first.items():
        assert (earlier / rel).read_text() == text, rel  # the earlier files, unchanged
        assert (tmp_path / rel).exists(), rel  # and the new evaluation's
    cfg.eval.bbh.limit = 2  # a third evaluation: a second earlier dir, the first one kept
    evaluate(cfg, {"adapter_none": True, "out": str(tmp_path)})
    assert len(list((tmp_path / "earlier_evals").iterdir())) in (1, 2)  # (two evaluations within one second)
    assert sum(1 for _ in (tmp_path / "earlier_evals").rglob("navigate*.jsonl")) == 2
    assert json.loads((tmp_path / "metrics" / "eval_bbh_mtlora_direct.json").read_text())["micro"]["n"] == 2
