"""``mtlora.export format=peft`` for DoRA (peft ``use_dora=True``) and M-LoRA (heads and offset folded into
one LoRA): ``PeftModel.from_pretrained`` gives the run's logits.

One tiny run per method is trained in this process (3 steps, high lr so that every tensor moves off its
init) and shared; M-LoRA's ``combine=mean`` reuses the trained weights under a relabelled config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from mtlora.adapters import MLoraLinear, adapter_layers
from mtlora.adapters.context import AdapterContext
from mtlora.export import ExportError, export_peft, main
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import load_run
from tests.helpers.compose import compose_train
from tests.helpers.training import EXPORT_PROMPTS, EXPORT_RUN

peft = pytest.importorskip("peft")

TRAIN, PROMPTS = EXPORT_RUN, EXPORT_PROMPTS


_RUNS: dict[str, Path] = {}


def _trained(method: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of ``method``'s tiny run (trained once per session)."""
    if method not in _RUNS:
        d = tmp_path_factory.mktemp(method) / "run"
        d.mkdir()
        cfg = compose_train([*TRAIN, f"adapter={method}"], run_dir=d)
        save_resolved_config(cfg, d)
        run_training(cfg, d)
        finish(d, ok=True)
        _RUNS[method] = d
    return _RUNS[method]


@pytest.fixture(scope="module", params=["dora", "mlora"])
def run(request, tmp_path_factory: pytest.TempPathFactory):
    """(method, run dir)."""
    return request.param, _trained(request.param, tmp_path_factory)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _peft_logits(out: Path, batch) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    return _logits(peft.PeftModel.from_pretrained(base, str(out)).eval(), batch)


def test_peft_export_loads_in_peft_with_the_same_logits(run, tmp_path: Path) -> None:
    method, d = run
    model, tokenizer = load_run(d)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    want = _logits(model, batch)
    layers = adapter_layers(model)
    out = export_peft(d, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    ours = load_file(str(out / "adapter_model.safetensors"))
    if method == "dora":
        assert config["use_dora"] is True and config["r"] == 8 and config["lora_alpha"] == 16
        assert len(ours) == 3 * len(layers)
        for name, layer in layers.items():  # the trained tensors, unchanged
            assert torch.equal(ours[f"base_model.model.{name}.lora_magnitude_vector"], layer.lora_magnitude)
            assert torch.equal(ours[f"base_model.model.{name}.lora_B.weight"], layer.lora_B)
    else:  # rank 4, 3 heads, offset on: one LoRA of rank 2·4, scaling 1
        assert config["use_dora"] is False and config["r"] == 8 and config["lora_alpha"] == 8.0
        assert config["use_rslora"] is False and config["lora_dropout"] == 0.0
        for name, layer in layers.items():  # B'A' is the layer's ΔW
            a = ours[f"base_model.model.{name}.lora_A.weight"]
            b = ours[f"base_model.model.{name}.lora_B.weight"]
            torch.testing.assert_close(b @ a, layer.delta_weight().detach(), atol=1e-6, rtol=1e-5)
    got = _peft_logits(out, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    base = _logits(AutoModelForCausalLM.from_pretrained(str(out / "base_model")), batch)
    assert (got - base).abs().max() > 1e-2  # the adapter matters

    # the key names and shapes are peft's own: save a fresh peft model with the exported config and compare
    fresh = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(out / "base_model")),
        peft.LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "inference_mode")}),
    )
    fresh.save_pretrained(str(tmp_path / "fresh"))
    theirs = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_mlora_mean_combine_exports_the_averaged_heads(tmp_path_factory, tmp_path: Path) -> None:
    d = _trained("mlora", tmp_path_factory)
    d = Path(shutil.copytree(d, tmp_path / "mean", ignore=shutil.ignore_patterns("export")))
    cfg = OmegaConf.load(d / "config_resolved.yaml")
    cfg.adapter.combine = "mean"
    OmegaConf.save(cfg, d / "config_resolved.yaml")
    model, tokenizer = load_run(d)
    assert all(m.head_coef == pytest.approx(1 / 3) for m in adapter_layers(model).values())
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    out = export_peft(d, tmp_path / "peft")
    torch.testing.assert_close(_peft_logits(out, batch), _logits(model, batch), atol=1e-5, rtol=0)
    assert main([f"run_dir={d}", "format=peft", f"out={out}"]) == 2  # not empty, no overwrite


@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_mlora_peft_tensors_reproduce_delta_weight(offset: bool, combine: str) -> None:
    """B'A' = s(c Σ_i B_i A − B̄_0 A_0), by explicit per-head sums; rank r, or 2r with the offset."""
    torch.manual_seed(0)
    layer = MLoraLinear(
        nn.Linear(16, 12),
        "x",
        AdapterContext(),
        rank=4,
        alpha=8.0,
        num_heads=3,
        init_offset=offset,
        combine=combine,
    )
    with torch.no_grad():
        layer.lora_B.add_(torch.randn_like(layer.lora_B))  # off the init: the offset no longer cancels
    t = layer.peft_tensors()
    a, b = t["lora_A.weight"], t["lora_B.weight"]
    assert a.shape == (8 if offset else 4, 16) and b.shape == (12, a.shape[0])
    c = 1.0 if combine == "sum" else 1 / 3
    want = sum(c * layer.lora_B[i].detach() @ layer.lora_A.detach() for i in range(3))
    if offset:
        want = want - layer.lora_offset_B @ layer.lora_offset_A
    torch.testing.assert_close(b @ a, 2.0 * want, atol=1e-5, rtol=1e-5)  # s = alpha / rank = 2


def test_routed_adapters_still_refuse_peft(run, tmp_path: Path) -> None:
    _, d = run
    d = Path(shutil.copytree(d, tmp_path / "copy", ignore=shutil.ignore_patterns("export")))
    cfg = d / "config_resolved.yaml"
    text = cfg.read_text()
    cfg.write_text(
        text.replace("method: dora", "method: hydralora").replace("method: mlora", "method: hydralora")
    )
    with pytest.raises(ExportError, match=r"only adapter.method in \['dora', 'lora', 'lorahub', 'mlora'\]"):
        export_peft(d, tmp_path / "p")
