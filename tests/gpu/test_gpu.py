"""GPU tests (``pytest -m gpu`` / ``make test-gpu``): skipped without CUDA, deselected by default.

* bf16 training of every adapter config on the tiny model (``hardware=gpu1``): finite losses that fall and
  track the fp32 run;
* DeepSpeed ZeRO-2 and ZeRO-3 on one GPU through the CLI (``hardware=gpu1_zero2|gpu1_zero3``; needs the
  ``deepspeed`` extra): in fp32 the loss curve equals the plain run's with gradient accumulation (the loop's
  loss normalisation and DeepSpeed's accumulation boundary agree); in bf16 the saved adapter has the plain
  run's keys and shapes, no empty tensor, and a non-zero ``lora_B`` (ZeRO-3 gathers before saving);
* merged == unmerged forward in bf16 within tolerance, for every mergeable adapter;
* greedy generation (``mtlora.eval.generate.greedy_generate``, as the BBH suite uses it) on the GPU gives the
  same tokens as on the CPU (fp32, TF32 off) on the tiny model with a task-aware adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlora.adapters import inject_adapters, merge_adapters
from mtlora.adapters.state import ADAPTER_WEIGHTS
from mtlora.eval.generate import greedy_generate, needs_task_ids
from mtlora.models import build_model, build_tokenizer
from tests.helpers.compose import CONF, compose_train, run_cli
from tests.helpers.training import SHORT_RUN, logged, train_tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# every adapter config but LoraHub (gradient-free composition of a LoRA library, not training)
ADAPTERS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml") if p.stem not in ("lorahub",))
GPU_RUN = [*SHORT_RUN, "hardware=gpu1"]


def _finite_and_falls(losses: list[float]) -> None:
    assert len(losses) == 6, losses
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bf16_training_of_every_adapter(adapter: str, tmp_path: Path) -> None:
    """bf16 (autocast) losses are finite, fall, and track the fp32 run of the same config on the GPU (not every
    config falls monotonically in 6 steps on the tiny model: align_kl does not, in fp32 either)."""
    runs = {
        prec: train_tiny(tmp_path, prec, [*GPU_RUN, f"train.precision={prec}", f"adapter={adapter}"])
        for prec in ("fp32", "bf16")
    }
    bf16, fp32 = logged(runs["bf16"]), logged(runs["fp32"])
    assert len(bf16) == 6 and all(math.isfinite(x) for x in bf16), bf16
    assert min(bf16[1:]) < bf16[0], bf16
    assert bf16 == pytest.approx(fp32, abs=0.1), (bf16, fp32)
    assert all(v is not None for v in logged(runs["bf16"], "peak_mem_gib"))  # logged only when CUDA is used
    assert (runs["bf16"] / "adapter" / ADAPTER_WEIGHTS).is_file()


# ------------------------------------------------------------------------------------------- DeepSpeed

# dropout off: the DeepSpeed and plain runs must not depend on how many random numbers each launcher drew
DS_RUN = [
    *GPU_RUN,
    "train.gradient_accumulation_steps=2",
    "train.micro_batch_size=4",
    "adapter=lora",
    "adapter.dropout=0",
]


def _cli(d: Path, overrides: list[str]) -> Path:
    r = run_cli([f"hydra.run.dir={d}", *overrides], timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (d / "COMPLETED").exists() or (d / "metrics" / "train.jsonl").exists()
    return d


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("deepspeed")  # before the two plain runs, which only the DeepSpeed tests compare with
    root = tmp_path_factory.mktemp("plain")
    return {prec: _cli(root / prec, [*DS_RUN, f"train.precision={prec}"]) for prec in ("fp32", "bf16")}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_fp32_loss_curve_equals_plain_run(stage: int, plain_runs, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    d = _cli(tmp_path / f"zero{stage}", [*DS_RUN, "train.precision=fp32", f"hardware=gpu1_zero{stage}"])
    ds = json.loads((d / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 2
    assert "--use_deepspeed" in (d / "launch_command.txt").read_text()
    got, ref = logged(d), logged(plain_runs["fp32"])
    _finite_and_falls(got)
    assert got == pytest.approx(ref, rel=2e-3, abs=2e-3), (got, ref)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_saves_a_complete_nonzero_adapter(stage: int, plain_runs, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    d = _cli(tmp_path / f"zero{stage}", [*DS_RUN, "train.precision=bf16", f"hardware=gpu1_zero{stage}"])
    assert json.loads((d / "deepspeed_config.json").read_text())["bf16"] == {"enabled": True}
    _finite_and_falls(logged(d))
    got = load_file(str(d / "adapter" / ADAPTER_WEIGHTS))
    ref = load_file(str(plain_runs["bf16"] / "adapter" / ADAPTER_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.numel() > 0 for v in got.values())
    b = [v for k, v in got.items() if k.endswith("lora_B")]
    assert b and all(bool(v.float().abs().sum() > 0) for v in b), "lora_B still zero after training"
    # same order of magnitude as the plain run's adapter (bf16 weights under DeepSpeed vs autocast)
    for k, v in got.items():
        torch.testing.assert_close(v.float(), ref[k].float(), atol=5e-2, rtol=0.2)


# ------------------------------------------------------------------------------------- merge, generation


def _tiny(adapter: str | None, device, dtype=torch.float32, seed: int = 0, scale: float = 0.1):
    cfg = compose_train([f"adapter={adapter}"] if adapter else [])
    tok = build_tokenizer(cfg.model)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if adapter:
        inject_adapters(model, cfg.adapter)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # non-zero adapter weights, so that merging changes the base weights
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.to(device=device, dtype=dtype).eval(), tok


@pytest.mark.parametrize("adapter", ADAPTERS)
@torch.no_grad()
def test_merged_equals_unmerged_in_bf16(adapter: str) -> None:
    model, tok = _tiny(adapter, "cuda", torch.bfloat16, scale=0.03)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"]], device="cuda")
    ctx = getattr(model, "adapter_context", None)
    if ctx is not None:
        ctx.begin(task_ids=torch.zeros(1, dtype=torch.long, device="cuda"))
    unmerged = model(input_ids=ids).logits.float()
    try:
        merge_adapters(model)
    except TypeError as e:
        pytest.skip(f"not mergeable: {e}")
    merged = model(input_ids=ids).logits.float()
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel < 3e-2, float(rel)  # bf16 rounding of the merged weights alone gives ~1e-2
    assert (merged.argmax(-1) == unmerged.argmax(-1)).float().mean() > 0.9


PROMPTS = [
    'Q: Is the following sentence plausible? "Joao Moutinho caught the screen pass."\nA: Let\'s think step by step.',
    "Q: not ( True ) and ( True ) is\nA:",
    "Q: Sort the following words alphabetically: List: pear apple fig\nA:",
]


@pytest.mark.parametrize("adapter", [None, "lora", "hydralora", "mtl_lora"])
def test_greedy_generation_on_gpu_equals_cpu(adapter: str | None, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    out = {}
    for device in ("cpu", "cuda"):
        model, tok = _tiny(adapter, device)
        kw = {"task_ids": 0} if needs_task_ids(model) else {}
        out[device] = greedy_generate(
            model, tok, PROMPTS, 12, stop=["\n\nQ:"], progress=False, return_ids=True, **kw
        )
    assert out["cuda"] == out["cpu"]
