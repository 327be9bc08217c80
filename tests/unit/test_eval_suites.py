"""The registry of evaluation suites (mtlora.eval.suites): every suite once, names known without torch, one
dispatcher that ``mtlora.evaluate`` and the end of a training run both go through, unknown names refused."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtlora.errors import ConfigError
from mtlora.eval import suites
from mtlora.eval.bbh import EXTRACTORS, PROTOCOLS, extract
from mtlora.eval.bbh.extraction import extractor
from mtlora.eval.outputs import write_suite_outputs
from mtlora.eval.suites import GENERATION, Suite, SuiteContext
from tests.helpers.compose import CONF, REPO, compose_train

BUILTIN = ["heldin", "heldin_samples", "bbh", "heldin_gen", "mmlu"]


def _toy_suite(name: str, calls: list) -> Suite:
    """A generation suite that writes one table row and one prediction per training task."""

    def run(ctx: SuiteContext) -> dict:
        calls.append(ctx)
        names = ctx.training_tasks() or ["only"]
        tasks = {t: {"n": 1, "accuracy": 1.0} for t in names}
        result = {
            "suite": name,
            "tasks": tasks,
            "macro": {"accuracy": 1.0, "n_tasks": len(tasks)},
            "micro": {"accuracy": 1.0, "n": len(tasks)},
        }
        preds = {t: [{"id": f"{t}/0", "correct": True}] for t in names}
        write_suite_outputs(name, result, ["task", "n", "accuracy"], "toy", preds, ctx.out_dir)
        ctx.report(name, f"{name}: all right", {f"{name}/macro": 1.0})
        return result

    return Suite(name, GENERATION, run, needs=frozenset({"tokenizer"}))


@pytest.fixture
def toy():
    calls: list = []
    suite = suites.register(_toy_suite("toy", calls))
    yield suite, calls
    suites.unregister("toy")


def test_registry_lists_every_suite_exactly_once():
    from mtlora.evaluate import SUITES

    names = [s.name for s in suites.all_suites()]
    assert names == BUILTIN  # dispatch order, each once
    assert list(suites.BUILTIN) == BUILTIN
    for name, module in suites.BUILTIN.items():  # each registered by its own module
        assert importlib.import_module(module).EVAL_SUITE is suites.get(name)
    assert suites.suite_names() == SUITES == ("heldin", "bbh", "heldin_gen", "mmlu")
    assert suites.get("heldin_samples").switch == "samples"  # turned on by eval.samples, not listed
    with pytest.raises(ValueError, match="already registered"):
        suites.register(suites.get("bbh"))
    # every suite a conf/eval preset lists is a registered one
    listed = {s for f in (CONF / "eval").glob("*.yaml") for s in OmegaConf.load(f).get("suites", [])}
    assert listed and listed <= set(suites.suite_names())


def test_suite_names_are_known_without_torch():
    code = (
        "import sys\nfrom mtlora.eval.suites import all_suites, suite_names\n"
        "assert len(all_suites()) == 5 and suite_names()\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "call",
    [
        lambda: suites.check_suites(["heldin", "bbhh"]),
        lambda: suites.check_suites([]),
        lambda: suites.check_suites(["heldin_samples"]),  # switched by eval.samples, not listable
        lambda: suites.get("bbhh"),
        lambda: suites.run_suites(["bbhh"], None),
        lambda: suites.output_names(["bbhh"], None),
    ],
)
def test_unknown_suite_is_a_one_line_config_error_naming_eval_suites(call):
    with pytest.raises(ConfigError, match="eval.suites") as e:
        call()
    assert "\n" not in str(e.value) and "heldin_gen" in str(e.value)  # names the choices


def test_evaluate_refuses_an_unknown_suite_before_loading_a_model(tmp_path: Path):
    from mtlora.evaluate import evaluate

    cfg = compose_train(["eval.suites=[heldin,nope]"])
    with pytest.raises(ConfigError, match=r"eval.suites=\['heldin', 'nope'\]") as e:
        evaluate(cfg, {"adapter_none": True})  # refused before out=DIR is asked for
    assert "\n" not in str(e.value)


def test_suite_metadata_and_output_names():
    bbh = suites.get("bbh")
    cfg = compose_train(["eval=bbh", "eval/bbh=align_lora"]).eval
    assert suites.output_names(["heldin", "bbh", "mmlu"], cfg) == ["heldin", "bbh_align_lora", "mmlu"]
    assert bbh.files(Path("R"), cfg) == [
        Path("R/metrics/eval_bbh_align_lora.json"),
        Path("R/metrics/eval_bbh_align_lora.csv"),
        Path("R/metrics/eval_bbh_align_lora.md"),
        Path("R/predictions/bbh_align_lora"),
    ]
    assert suites.get("heldin").files(Path("R"), cfg) == [
        Path("R/metrics/eval_heldin.json"),
        Path("R/metrics/eval_heldin.md"),
    ]
    assert suites.get("heldin").mode == suites.TEACHER_FORCED
    assert {s.name for s in suites.all_suites() if s.mode == GENERATION} == set(BUILTIN) - {"heldin"}
    with pytest.raises(ValueError, match="mode"):
        Suite("x", "sampling", lambda ctx: None)
    with pytest.raises(ValueError, match="needs"):
        Suite("x", GENERATION, lambda ctx: None, needs=frozenset({"gpu"}))


def test_end_of_run_suites_follow_the_registry_order():
    cfg = OmegaConf.create({"suites": ["mmlu", "heldin", "bbh"], "samples": {"per_task": 3}})
    assert suites.end_of_run_suites(cfg) == ["heldin_samples", "bbh", "mmlu"]  # heldin: the training loop's
    cfg.samples = None
    cfg.suites = ["heldin"]
    assert suites.end_of_run_suites(cfg) == []


def test_a_registered_suite_is_run_by_evaluate(tmp_path: Path, toy):
    from mtlora.evaluate import evaluate

    suite, calls = toy
    assert "toy" in suites.suite_names()
    cfg = compose_train(["eval.suites=[toy]"])
    out = tmp_path / "out"
    res = evaluate(cfg, {"adapter_none": True, "out": str(out)})
    assert list(res) == ["toy"] and len(calls) == 1 and calls[0].out_dir == out
    assert all(p.exists() for p in suite.files(out, cfg.eval))
    assert json.loads((out / "metrics" / "eval_toy.json").read_text())["suite"] == "toy"
    evaluate(cfg, {"adapter_none": True, "out": str(out)})  # a second evaluation keeps the first one's files
    assert len(calls) == 2 and len(list((out / "earlier_evals").glob("*/metrics/eval_toy.json"))) == 1


class _Tracker:
    def __init__(self) -> None:
        self.logged: list = []
        self.summaries: dict = {}

    def log(self, values: dict, step) -> None:
        self.logged.append((values, step))

    def summary(self, values: dict) -> None:
        self.summaries.update(values)


def test_a_registered_suite_is_run_at_the_end_of_training(tmp_path: Path, toy):
    from mtlora.procedures.common import generation_suites_at_end

    suite, calls = toy
    cfg = compose_train(["eval.suites=[heldin,toy]", "eval.samples=null"])
    data = OmegaConf.create({"task_names": ["a", "b"]})  # the toy suite reads only the task names
    tracker = _Tracker()
    generation_suites_at_end(cfg, torch.nn.Linear(1, 1), object(), data, tmp_path, tracker, 7)
    assert len(calls) == 1 and calls[0].data is data and calls[0].training_tasks() == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "predictions" / "toy").iterdir()) == ["a.jsonl", "b.jsonl"]
    assert tracker.logged == [({"eval/toy/macro": 1.0}, 7)] and tracker.summaries == {"final/toy/macro": 1.0}
    assert not (tmp_path / "metrics" / "eval_heldin.json").exists()  # heldin is the training loop's own
    cfg.eval.at_end = False
    generation_suites_at_end(cfg, torch.nn.Linear(1, 1), object(), data, tmp_path, tracker, 7)
    assert len(calls) == 1


def test_a_suite_is_refused_a_context_without_what_it_needs(tmp_path: Path, toy):
    ctx = SuiteContext(OmegaConf.create({"suites": ["toy"]}), OmegaConf.create({}), None, None, tmp_path)
    with pytest.raises(ConfigError, match="'toy' needs a tokenizer"):
        suites.run_suites(["toy"], ctx)


def test_bbh_extractor_table_covers_every_protocol():
    used = {p.extraction for p in PROTOCOLS.values()}
    assert used == set(EXTRACTORS)  # no protocol without an extractor, no extractor without a protocol
    for p in PROTOCOLS.values():
        assert extractor(p) is EXTRACTORS[p.extraction]
    bad = dataclasses.replace(PROTOCOLS["lmeval_fewshot"], name="x", extraction="nope")
    with pytest.raises(ConfigError, match="protocol 'x' has unknown extraction 'nope'"):
        extract(bad, "navigate", "Yes")
