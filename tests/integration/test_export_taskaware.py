"""``mtlora.export format=merged task_id=...`` for task-aware runs (MTL-LoRA, MOELoRA): a plain HF model
whose logits equal the run's model on rows of that task; clear errors naming ``task_id``.

One tiny run per method is trained in this process (3 steps, high lr so that B moves off 0) and shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mtlora.adapters import adapter_layers
from mtlora.adapters.base import AdapterLayer
from mtlora.export import ExportError, export_merged, export_peft, export_run, main
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import load_run
from tests.helpers.compose import compose_train
from tests.helpers.training import EXPORT_PROMPTS, EXPORT_RUN

TRAIN, PROMPTS = EXPORT_RUN, EXPORT_PROMPTS


@pytest.fixture(scope="module", params=["mtl_lora", "moelora"])
def run(request, tmp_path_factory: pytest.TempPathFactory):
    """(run dir, task names, loaded model, tokenized prompts)."""
    d = tmp_path_factory.mktemp(request.param) / "run"
    d.mkdir()
    cfg = compose_train([*TRAIN, f"adapter={request.param}"], run_dir=d)
    save_resolved_config(cfg, d)
    run_training(cfg, d)
    finish(d, ok=True)
    names = json.loads((d / "adapter" / "adapter_config.json").read_text())["task_names"]
    model, tokenizer = load_run(d)
    assert all(float(m.lora_B.detach().abs().max()) > 0 for m in adapter_layers(model).values())
    return d, names, model, tokenizer(PROMPTS, padding=True, return_tensors="pt")


@torch.no_grad()
def _logits(model, batch, task: int | None = None) -> torch.Tensor:
    if task is not None:
        model.adapter_context.begin(task_ids=torch.full((len(PROMPTS),), task))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_merged_export_for_a_task_equals_the_run_on_that_task(run, tmp_path: Path) -> None:
    d, names, model, batch = run
    assert len(names) == 4
    want = {t: _logits(model, batch, t) for t in range(len(names))}
    for t, task_id in ((1, names[1]), (3, 3)):  # by name and by id
        out = export_merged(d, tmp_path / f"task{t}", task_id=task_id)
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
        assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
        got = _logits(merged, batch)
        torch.testing.assert_close(got, want[t], atol=2e-5, rtol=0)
        other = (t + 1) % len(names)
        assert (got - want[other]).abs().max() > 1e-3  # another task's rows give other logits
        info = json.loads((out / "mtlora_export.json").read_text())
        assert info["format"] == "merged" and info["task_id"] == t and info["task_name"] == names[t]
    # the run's model is untouched by the export (it loads its own copy)
    torch.testing.assert_close(_logits(model, batch, 1), want[1], atol=0, rtol=0)


def test_cli_task_id_errors_name_task_id(run, tmp_path: Path, capsys) -> None:
    d, names, _, _ = run
    method = json.loads((d / "adapter" / "adapter_config.json").read_text())["adapter"]["method"]
    out = tmp_path / "m"
    assert main([f"run_dir={d}", "format=merged", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert f"run dir {d}" in err and f"adapter.method='{method}'" in err and "task_id=" in err
    assert str(names) in err and not out.exists()
    for bad in ("nosuchtask", "4", "-1"):
        assert main([f"run_dir={d}", "format=merged", f"out={out}", f"task_id={bad}"]) == 2
        err = capsys.readouterr().err
        assert f"task_id={bad} is not a task of this run" in err.replace("'", "") and str(names) in err
        assert not out.exists()
    with pytest.raises(ExportError, match=r"exports to peft \(try format=merged task_id=<task>\)"):
        export_peft(d, tmp_path / "p")
    with pytest.raises(ExportError, match="task_id=0 applies only to format=merged"):
        export_run(d, "peft", tmp_path / "p", task_id=0)
    assert main([f"run_dir={d}", "format=merged", f"out={out}", "task_id=2"]) == 0
    assert json.loads((out / "mtlora_export.json").read_text())["task_name"] == names[2]


def test_task_id_is_refused_for_runs_without_tasks(run, tmp_path: Path) -> None:
    """The check runs on the config, before any weights load: a run relabelled as plain LoRA suffices."""
    d = Path(shutil.copytree(run[0], tmp_path / "copy"))
    cfg = d / "config_resolved.yaml"
    method = json.loads((d / "adapter" / "adapter_config.json").read_text())["adapter"]["method"]
    cfg.write_text(cfg.read_text().replace(f"method: {method}", "method: lora"))
    with pytest.raises(ExportError, match="task_id=1 applies only to task-aware runs.*drop task_id"):
        export_merged(d, tmp_path / "m", task_id=1)
