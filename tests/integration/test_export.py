"""Loading a finished run (``mtlora.trained_run.load_run``) and exporting it (``mtlora.export``): same logits as
the trained model, in mtlora, in peft and as a merged HF model; clear errors for unusable run dirs.

One tiny run is trained in this process (3 steps, high lr so that every B is non-zero) and shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import mtlora.procedures.finetune.recipe as loop
from mtlora.adapters import LoraLinear, adapter_layers, find_targets, inject_adapters, save_adapter
from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.registry import ADAPTER_METHODS, registered
from mtlora.adapters.spec import MethodSpec
from mtlora.export import ExportError, _peft_target_modules, export_merged, export_peft, main
from mtlora.models import build_model
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import RunLoadError, load_base_model, load_run
from tests.helpers.compose import compose_train, run_module
from tests.helpers.training import EXPORT_PROMPTS, EXPORT_RUN

TRAIN, PROMPTS = EXPORT_RUN, EXPORT_PROMPTS


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(run dir, the trained model as it was in memory at the end of training)."""
    d = tmp_path_factory.mktemp("export") / "run"
    d.mkdir()
    captured = {}
    build = loop.build_model_and_data

    def capture(cfg):
        tokenizer, model, data = build(cfg)
        captured["model"] = model
        return tokenizer, model, data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_model_and_data", capture)
        cfg = compose_train(TRAIN, run_dir=d)
        save_resolved_config(cfg, d)  # what train.run does around run_training
        run_training(cfg, d)
    finish(d, ok=True)
    return d, captured["model"].eval()


@pytest.fixture(scope="module")
def loaded(trained):
    run_dir, _ = trained
    model, tokenizer = load_run(run_dir)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return model, tokenizer, batch, _logits(model, batch)


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("export")))


def test_load_run_gives_the_trained_model(trained, loaded) -> None:
    _, mem = trained
    model, tokenizer, batch, logits = loaded
    assert not model.training
    layers = adapter_layers(model)
    assert layers and all(type(m) is LoraLinear for m in layers.values())
    # trained: every B moved off 0
    assert all(float(m.lora_B.detach().abs().sum()) > 0 for m in layers.values())
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded rows are covered
    torch.testing.assert_close(logits, _logits(mem, batch), atol=1e-5, rtol=0)
    assert tokenizer.decode(tokenizer("12+7=")["input_ids"], skip_special_tokens=True) == "12+7="


def test_peft_export_loads_in_peft_with_the_same_logits(trained, loaded, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    run_dir, _ = trained
    model, _, batch, logits = loaded
    out = export_peft(run_dir, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["use_rslora"] is False
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert Path(config["base_model_name_or_path"]) == (out / "base_model").resolve()

    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(_logits(pm, batch), logits, atol=1e-5, rtol=0)

    # the key names and shapes are peft's own: save a fresh peft model with the exported config and compare
    fresh = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(out / "base_model")),
        peft.LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "inference_mode")}),
    )
    fresh.save_pretrained(str(tmp_path / "fresh"))
    theirs = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert len(ours) == 2 * len(adapter_layers(model))


def test_merged_export_is_a_plain_model_with_the_same_logits(trained, loaded, tmp_path: Path) -> None:
    run_dir, _ = trained
    _, _, batch, logits = loaded
    out = export_merged(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batch), logits, atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").exists()
    with pytest.raises(ExportError, match="not empty; pass overwrite=true"):
        export_merged(run_dir, out)


@torch.no_grad()
def _greedy_until_eos(model, ids: list[int], eos: int, n: int) -> list[int]:
    """Greedy continuation by full forward passes, ending with ``eos`` when it is the argmax (reference)."""
    out: list[int] = []
    for _ in range(n):
        t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(t)
        if t == eos:
            break
    return out


def _assert_generate_stops_at_eos(model_dir: Path) -> None:
    """The saved configs carry the tokenizer's special ids, and HF ``generate`` on the saved model stops at
    EOS. To make EOS come up, the EOS row of the output embedding is set (in the weights file only, configs
    untouched) to ``c·h/|h|²``, with ``h`` the final hidden state 3 tokens into the continuation and ``c``
    10 above that step's largest logit: EOS then wins at that step at the latest."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert None not in special.values()
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((model_dir / name).read_text())
        assert {k: saved.get(k) for k in special} == special, name

    eos, ids, n_new = special["eos_token_id"], tok(PROMPTS[0])["input_ids"], 32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    cont = _greedy_until_eos(model, ids, eos, 3)
    assert len(cont) == 3 and eos not in cont  # the untouched random model does not stop by itself
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids + cont]), output_hidden_states=True)
    h, top = out.hidden_states[-1][0, -1], float(out.logits[0, -1].max())
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    key = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"  # tied: one tensor
    weights[key][eos] = h * (top + 10.0) / h.dot(h)
    save_file(weights, str(path), metadata={"format": "pt"})

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    want = _greedy_until_eos(model, ids, eos, n_new)
    assert want[-1] == eos and len(want) <= 4
    got = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n_new, do_sample=False)  # fmt: skip
    assert got[0, len(ids) :].tolist() == want  # stopped at EOS, well before max_new_tokens


def test_exports_carry_the_tokenizer_special_ids_and_generate_stops_at_eos(trained, tmp_path: Path) -> None:
    run_dir, _ = trained
    _assert_generate_stops_at_eos(export_merged(run_dir, tmp_path / "merged"))
    _assert_generate_stops_at_eos(export_peft(run_dir, tmp_path / "peft") / "base_model")


def test_tampered_base_weights_fail_the_fingerprint_check(trained, tmp_path: Path) -> None:
    d = _copy_run(trained[0], tmp_path)
    path = d / "base_model" / "model.safetensors"
    weights = load_file(str(path))
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, str(path))
    with pytest.raises(RunLoadError, match=f"run dir {d}.*fingerprint_sha256"):
        load_run(d)


def test_unusable_run_dirs_give_clear_errors(trained, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RunLoadError, match=f"run dir {missing} does not exist"):
        load_run(missing)
    d = _copy_run(trained[0], tmp_path)
    (d / "COMPLETED").unlink()
    (d / "FAILED").write_text("2025-01-01T00:00:00\nRuntimeError('boom')\n")
    with pytest.raises(RunLoadError, match=rf"run dir {d} is not COMPLETED \(status: FAILED .*boom"):
        load_run(d)
    model, _ = load_run(d, allow_incomplete=True)  # the saved adapter loads when asked for explicitly
    assert adapter_layers(model)
    (d / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(RunLoadError, match=f"run dir {d} lacks adapter/adapter_model.safetensors"):
        load_run(d, allow_incomplete=True)


def test_unmergeable_adapters_do_not_export(trained, tmp_path: Path, capsys) -> None:
    class Routed(AdapterLayer):  # stands for a task-routed adapter (not mergeable, not LoRA)
        pass

    spec = MethodSpec(name="routed_test", layer=Routed, doc="a stand-in", token_routed=True)
    with registered(spec):
        _refused_with_reasons(trained, tmp_path, capsys)


def _refused_with_reasons(trained, tmp_path: Path, capsys) -> None:
    d = _copy_run(trained[0], tmp_path)
    cfg = d / "config_resolved.yaml"
    cfg.write_text(cfg.read_text().replace("method: lora", "method: routed_test"))
    for fmt in ("merged", "peft"):
        assert main([f"run_dir={d}", f"format={fmt}", f"out={tmp_path / fmt}"]) == 2
        err = capsys.readouterr().err
        assert f"run dir {d}" in err and "routed_test" in err and "mtlora.load_run" in err
        assert not (tmp_path / fmt).exists()
    assert main([f"run_dir={d}", "format=onnx"]) == 2
    assert "format='onnx': allowed values are ['peft', 'merged']" in capsys.readouterr().err
    assert main([f"run_dir={d}", "colour=red"]) == 2
    assert "unknown argument 'colour=red'" in capsys.readouterr().err


def test_pretrained_runs_reload_from_the_hub_id_and_export_a_reference(
    trained, loaded, tmp_path: Path
) -> None:
    """model.init=pretrained: the base comes from model.hub_id (a local HF dir stands in for the hub), the
    fingerprint still guards it, and the peft export refers to the hub id instead of copying the base."""
    peft = pytest.importorskip("peft")
    _, _, batch, logits = loaded
    d = _copy_run(trained[0], tmp_path)
    hub = tmp_path / "hub_model"
    load_base_model(d).save_pretrained(str(hub))
    cfg = OmegaConf.load(d / "config_resolved.yaml")
    cfg.model.init, cfg.model.hub_id = "pretrained", str(hub)
    OmegaConf.save(cfg, d / "config_resolved.yaml")
    model, _ = load_run(d)
    torch.testing.assert_close(_logits(model, batch), logits, atol=1e-5, rtol=0)
    out = export_peft(d, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hub)
    assert not (out / "base_model").exists()
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hub)), str(out)).eval()
    torch.testing.assert_close(_logits(pm, batch), logits, atol=1e-5, rtol=0)


@pytest.mark.skipif(
    "mlora" not in ADAPTER_METHODS or "hydralora" not in ADAPTER_METHODS, reason="multi-head adapters absent"
)
def test_multihead_adapters_load_and_mergeable_ones_export_merged(trained, tmp_path: Path) -> None:
    """load_run and the merged export are generic over adapter methods: M-LoRA (mergeable, with adapter
    buffers) merges exactly; HydraLoRA (token router) loads but is refused by both export formats."""
    d = _copy_run(trained[0], tmp_path)
    for method in ("mlora", "hydralora"):
        cfg = OmegaConf.load(d / "config_resolved.yaml")
        cfg.adapter = compose_train([f"adapter={method}"]).adapter
        OmegaConf.save(cfg, d / "config_resolved.yaml")
        model = load_base_model(d, cfg)
        inject_adapters(model, cfg.adapter)
        torch.manual_seed(0)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                layer.lora_B.normal_(0, 0.05)
        save_adapter(model, d / "adapter", {})
        loaded_model, tokenizer = load_run(d)
        batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        loaded_model.adapter_context.begin(task_ids=torch.tensor([0, 1, 2]))
        ref = _logits(loaded_model, batch)
        model.eval().adapter_context.begin(task_ids=torch.tensor([0, 1, 2]))
        torch.testing.assert_close(ref, _logits(model, batch), atol=1e-6, rtol=0)
        if method == "mlora":
            merged = AutoModelForCausalLM.from_pretrained(str(export_merged(d, tmp_path / method)))
            torch.testing.assert_close(_logits(merged, batch), ref, atol=1e-4, rtol=0)
        else:
            with pytest.raises(ExportError, match="cannot be merged"):
                export_merged(d, tmp_path / method)
        if method == "mlora":  # one converted LoRA; logits: test_export_peft_variants.py
            assert (export_peft(d, tmp_path / f"{method}_peft") / "adapter_config.json").exists()
        else:
            with pytest.raises(ExportError, match=r"only adapter.method in \[.*'lora'.*\] exports to peft"):
                export_peft(d, tmp_path / f"{method}_peft")


def test_target_modules_fall_back_to_full_names_when_suffixes_select_more() -> None:
    base = build_model(compose_train(["adapter.target_modules=all-linear"]).model)
    everything = find_targets(base, ["q_proj", "v_proj"])
    assert _peft_target_modules(base, everything) == ["q_proj", "v_proj"]
    layer0 = find_targets(base, r"model\.layers\.0\..*_proj")
    names = _peft_target_modules(base, layer0)
    assert names == sorted(layer0)
    assert find_targets(base, names) == layer0  # peft's list matching (= mtlora's) selects exactly these


def test_cli_exports_peft(trained, loaded, tmp_path: Path) -> None:
    run_dir, _ = trained
    out = tmp_path / "cli_peft"
    r = run_module("mtlora.export", [f"run_dir={run_dir}", "format=peft", f"out={out}"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PeftModel.from_pretrained" in r.stdout + r.stderr
    for rel in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "base_model/config.json",
        "mtlora_export.json",
    ]:
        assert (out / rel).exists(), rel
    weights = load_file(str(out / "adapter_model.safetensors"))
    model = loaded[0]
    for name, layer in adapter_layers(model).items():
        assert torch.equal(weights[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.detach())
