"""What loading, evaluating, exporting and diagnosing a run dir never does: run code shipped in it, write
into another run, or trust corrupted files without saying so.

One tiny run is trained in this process and shared; each test works on a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from mtlora.diagnose import diagnose
from mtlora.errors import ConfigError
from mtlora.evaluate import evaluate, split_argv
from mtlora.export import ExportError, export_run, parse_args
from mtlora.export import main as export_main
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import finish, save_resolved_config
from mtlora.trained_run import RunLoadError, load_run
from tests.helpers.compose import compose_train
from tests.helpers.training import EXPORT_RUN


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("safety") / "run"
    d.mkdir()
    cfg = compose_train(EXPORT_RUN, run_dir=d)
    save_resolved_config(cfg, d)  # what train.run does around run_training
    run_training(cfg, d)
    finish(d, ok=True)
    return d


def _copy(run_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / name))


# --- remote code ----------------------------------------------------------------------------------------

EVIL_CONFIG = """{"model_type": "evil_test_model", "architectures": ["EvilModel"],
 "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}"""
EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("executed")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil_test_model"
raise RuntimeError("the evil module ran")
"""


def _plant_remote_code(d: Path, tmp_path: Path) -> Path:
    """Point the run's config at a model folder whose ``auto_map`` code writes a marker file when imported,
    with ``trust_remote_code: true``; returns the marker's path."""
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil_model"
    evil.mkdir()
    (evil / "config.json").write_text(EVIL_CONFIG)
    (evil / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    cfg = OmegaConf.load(d / "config_resolved.yaml")
    cfg.model.init, cfg.model.hub_id, cfg.model.trust_remote_code = "pretrained", str(evil), True
    OmegaConf.save(cfg, d / "config_resolved.yaml")
    return marker


def test_loading_a_run_never_enables_remote_code_by_itself(trained, tmp_path: Path, capsys) -> None:
    d = _copy(trained, tmp_path)
    marker = _plant_remote_code(d, tmp_path)
    refused = rf"run dir {d}: config_resolved.yaml sets model.trust_remote_code=true.*trust_remote_code=true"
    with pytest.raises(RunLoadError, match=refused):
        load_run(d)
    for fmt in ("peft", "merged"):
        assert (
            export_main([f"run_dir={d}", f"format={fmt}", f"out={tmp_path / fmt}"]) == 2
        )  # a user error: exit status 2
        assert "model.trust_remote_code=true" in capsys.readouterr().err
    eval_cfg = compose_train(["eval.suites=[heldin]"])
    with pytest.raises(RunLoadError, match=refused):
        evaluate(eval_cfg, {"run_dir": str(d)})
    with pytest.raises(RunLoadError, match=refused):
        diagnose(d, compose_train(["diagnostics=default"]).diagnostics)
    assert not marker.exists()
    # the explicit flag of the command line is what enables it (here the planted code then runs and fails)
    with pytest.raises(Exception, match="the evil module ran"):
        load_run(d, trust_remote_code=True)
    assert marker.exists()


def test_remote_code_flag_is_parsed_strictly_on_every_command_line() -> None:
    assert parse_args(["run_dir=R", "format=peft", "trust_remote_code=true"])["trust_remote_code"] is True
    with pytest.raises(ValueError, match="trust_remote_code='ture'"):
        parse_args(["run_dir=R", "format=peft", "trust_remote_code=ture"])
    _, opts = split_argv(["evaluate", "run_dir=R", "trust_remote_code=true"])
    assert opts["trust_remote_code"] is True
    _, opts = split_argv(["evaluate", "run_dir=R"])
    assert not opts.get("trust_remote_code")


# --- outputs never replace another run's files ----------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_evaluate_refuses_to_write_into_another_run(trained, tmp_path: Path) -> None:
    a, b = _copy(trained, tmp_path, "a"), _copy(trained, tmp_path, "b")
    before = _snapshot(b)
    cfg = compose_train(["eval.suites=[heldin]", "eval.max_examples_per_task=2"])
    for out in (b, b / "metrics", a / "adapter"):
        with pytest.raises(ConfigError, match=f"out={out} is inside the"):
            evaluate(cfg, {"run_dir": str(a), "out": str(out)})
    assert _snapshot(b) == before
    evaluate(cfg, {"run_dir": str(a), "out": str(a)})  # its own run dir (the default) is where it writes
    assert (a / "metrics" / "eval_heldin.json").is_file()


def test_export_never_writes_into_a_run_adapter_or_another_run(trained, tmp_path: Path) -> None:
    a, b = _copy(trained, tmp_path, "a"), _copy(trained, tmp_path, "b")
    before_a, before_b = _snapshot(a), _snapshot(b)
    for fmt in ("peft", "merged"):
        for out in (a / "adapter", b / "adapter", b, b / "exported", a):
            with pytest.raises(ExportError, match=f"out={out} is "):
                export_run(a, fmt, out=out, overwrite=True)
    assert _snapshot(a) == before_a and _snapshot(b) == before_b
    assert (export_run(a, "peft", overwrite=True) / "adapter_model.safetensors").is_file()  # a/export/peft


# --- damaged files ---------------------------------------------------------------------------------------


def _flip_last_bytes(path: Path, n: int = 64) -> None:
    """Change tensor bytes at the end of a safetensors file: the header still parses."""
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(b ^ 0x5A for b in data[-n:])
    path.write_bytes(bytes(data))


def test_damaged_adapter_bytes_are_refused_by_every_command(trained, tmp_path: Path, capsys) -> None:
    d = _copy(trained, tmp_path)
    weights = d / "adapter" / "adapter_model.safetensors"
    _flip_last_bytes(weights)
    damaged = rf"{weights} is damaged: its SHA-256 .* differs"
    with pytest.raises(RunLoadError, match=damaged):
        load_run(d)
    for fmt in ("peft", "merged"):
        assert (
            export_main([f"run_dir={d}", f"format={fmt}", f"out={tmp_path / fmt}"]) == 2
        )  # a user error: exit status 2
        assert f"{weights} is damaged" in capsys.readouterr().err
        assert not (tmp_path / fmt).exists()
    with pytest.raises(RunLoadError, match=damaged):
        evaluate(compose_train(["eval.suites=[heldin]"]), {"run_dir": str(d)})
    with pytest.raises(RunLoadError, match=damaged):
        diagnose(d, compose_train(["diagnostics=default"]).diagnostics)


def test_truncated_adapter_and_base_weights_name_the_file(trained, tmp_path: Path) -> None:
    d = _copy(trained, tmp_path)
    weights = d / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RunLoadError, match=rf"{weights} is damaged"):
        load_run(d)
    (d / "adapter" / "checksums.json").unlink()  # a run saved before checksums: still named, by parsing
    with pytest.raises(RunLoadError, match=rf"{weights} is damaged \(cannot be parsed"):
        load_run(d)
    d2 = _copy(trained, tmp_path, "copy2")
    base = d2 / "base_model" / "model.safetensors"
    base.write_bytes(base.read_bytes()[:100])
    with pytest.raises(RunLoadError, match=rf"{base} is damaged"):
        load_run(d2)


def test_export_refuses_non_finite_weights(trained, tmp_path: Path) -> None:
    """A diverged run (its files intact, their checksums recorded): nothing is written."""
    from mtlora.run.checksums import write_manifest

    d = _copy(trained, tmp_path)
    path = d / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(path))
    write_manifest(d / "adapter")
    for fmt in ("peft", "merged"):
        with pytest.raises(ExportError, match=r"non-finite weight"):
            export_run(d, fmt, out=tmp_path / fmt)
        assert not (tmp_path / fmt).exists()
