"""LoraHub end to end: two tiny task LoRAs trained by the runner, composed in-process (the recommendation or the
best evaluated point loaded) and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mtlora.data.build import build_data
from mtlora.data.collate import collate
from mtlora.export import export_peft
from mtlora.train import run
from mtlora.trained_run import load_run
from tests.helpers.compose import compose_train, run_cli

TASKS = ("boolean_expressions", "counting")
LIB = ["debug=smoke", "train.max_steps=12", "eval=none", "data.budget=128", "logger=none"]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One short LoRA per task, trained through ``mtlora.train.run`` (markers, config, adapter, base)."""
    root = tmp_path_factory.mktemp("lorahub_lib")
    dirs = []
    for task in TASKS:
        d = root / task
        run(compose_train([*LIB, f"data.select=[{task}]"], run_dir=d), d)
        dirs.append(d)
    return dirs


def _fewshot_ce(model, cfg, res: dict, tokenizer) -> float:
    """The few-shot CE of ``model`` recomputed from the rows recorded in lorahub.json."""
    data = build_data(cfg.data, tokenizer, int(cfg.model.max_seq_len))
    rows = [
        (data.task_names.index(t), data.train[data.task_names.index(t)][i])
        for t, idx in res["fewshot_rows"].items()
        for i in idx
    ]
    assert len(rows) == len(TASKS) * cfg.adapter.fewshot_per_task
    total, tokens = 0.0, 0
    bs = res["fewshot_batch_size"]
    with torch.no_grad():
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            b = collate([r for _, r in chunk], [t for t, _ in chunk], tokenizer.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = b["labels"][:, 1:]
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
            )
            total += float(ce)
            tokens += int((labels != -100).sum())
    return total / tokens


def _compose(library: list[Path], d: Path, extra: list[str]):
    cfg = compose_train(
        [
            "adapter=lorahub",
            "adapter.library=[" + ",".join(f"'{p}'" for p in library) + "]",
            "adapter.budget=10",
            f"data.select=[{','.join(TASKS)}]",
            "eval.max_examples_per_task=8",
            "logger=none",
            *extra,
        ],
        run_dir=d,
    )
    run(cfg, d)
    return cfg, json.loads((d / "metrics" / "lorahub.json").read_text())


def _saved_weights_are_the_composition(d: Path, library: list[Path], w: list[float]) -> None:
    """The saved adapter is Σ w_i A_i, Σ w_i B_i of the library weights."""
    saved = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    libs = [load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in library]
    for k, v in saved.items():
        torch.testing.assert_close(v, sum(wi * lib[k] for wi, lib in zip(w, libs)), rtol=1e-5, atol=1e-6)


def test_composition_loads_the_recommendation_and_reloads(library: list[Path], tmp_path: Path) -> None:
    d = tmp_path / "hub"
    cfg, res = _compose(library, d, [])
    assert (d / "COMPLETED").exists() and (d / "metrics" / "eval_heldin.json").exists()
    names = [str(p.resolve()) for p in library]
    assert res["modules"] == names and list(res["weights"]) == names and res["budget"] == 10
    assert len(res["evaluations"]) == 10
    n = len(TASKS) * cfg.adapter.fewshot_per_task
    assert (res["result"], res["ce_norm"], res["n_examples"]) == ("recommendation", "n_examples", n)
    # the loaded weights are Nevergrad's recommendation [code]; the best evaluated point is recorded too
    assert res["weights"] == res["recommendation"]["weights"] and res["loss"] == res["recommendation"]["loss"]
    best = res["best_evaluated"]
    assert best["loss"] == pytest.approx(min([r["loss"] for r in res["evaluations"]] + [res["loss_at_zero"]]))
    assert list(best["weights"]) == names
    w = [res["weights"][k] for k in names]
    assert any(abs(x) > 1e-6 for x in w) and all(abs(x) <= 1.5 for x in w)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["lorahub"]["loss"] == res["loss"] and meta["lorahub"]["result"] == "recommendation"

    model, tok = load_run(d)
    # the loaded weights reproduce the reported objective through the saved run: CE̅ / n + l1 · mean|w|
    l1 = cfg.adapter.l1 * sum(abs(x) for x in w) / len(w)
    ce = _fewshot_ce(model, cfg, res, tok)
    assert ce == pytest.approx(res["ce"], rel=1e-5)
    assert ce / n + l1 == pytest.approx(res["loss"], rel=1e-5)
    _saved_weights_are_the_composition(d, library, w)
    # the base model's loss (all B zeroed) is the reported loss at w = 0, and the composition beats it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()
    base = _fewshot_ce(model, cfg, res, tok)
    assert res["ce_at_zero"] == pytest.approx(base, rel=1e-5)
    assert res["loss_at_zero"] == pytest.approx(base / n, rel=1e-5)
    assert best["ce"] < base - 0.05 and best["loss"] < res["loss_at_zero"], (best, base)

    out = export_peft(d, tmp_path / "peft")  # exports like a plain LoRA run
    assert (out / "adapter_model.safetensors").exists()


def test_result_best_evaluated_loads_the_best_point(library: list[Path], tmp_path: Path) -> None:
    d = tmp_path / "best"
    _, res = _compose(library, d, ["adapter.result=best_evaluated", "eval=none"])
    names = [str(p.resolve()) for p in library]
    assert res["result"] == "best_evaluated" and res["weights"] == res["best_evaluated"]["weights"]
    assert res["loss"] == res["best_evaluated"]["loss"]
    _saved_weights_are_the_composition(d, library, [res["weights"][k] for k in names])


def test_cli_composes_a_library_glob(library: list[Path], tmp_path: Path) -> None:
    d = tmp_path / "cli"
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "adapter=lorahub",
            f"adapter.library_glob={library[0].parent}/*",
            "adapter.budget=3",
            "adapter.fewshot_per_task=2",
            f"data.select=[{','.join(TASKS)}]",
            # the composition runs the generation suites too (a LoraHub table cell reports BBH)
            "eval=bbh",
            "eval.suites=[bbh]",
            "eval.bbh.tasks=[navigate]",
            "eval.bbh.limit=1",
            "eval.bbh.max_new_tokens=4",
            "logger=none",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "COMPLETED").exists() and (d / "adapter" / "adapter_model.safetensors").exists()
    bbh = json.loads((d / "metrics" / "eval_bbh_mtlora_direct.json").read_text())
    assert bbh["micro"]["n"] == 1 and (d / "predictions" / "bbh_mtlora_direct" / "navigate.jsonl").exists()
    res = json.loads((d / "metrics" / "lorahub.json").read_text())
    assert len(res["modules"]) == 2 and len(res["evaluations"]) == 3
    assert "LoraHub: loaded the recommendation" in (d / "train.log").read_text()
