"""DeepSpeed ZeRO-2 and ZeRO-3 (also with optimizer and parameter offload) through the CLI on the CPU
(``hardware=cpu2_zero2|cpu2_zero3``: two processes, DeepSpeed's CPU accelerator, gloo), so that the ZeRO
code path is tested without a GPU.

``cpu2_zero3`` partitions every parameter (``param_persistence_threshold: 0``; the tiny model's tensors are
all below DeepSpeed's default threshold, which would leave them whole). Two processes with 4 rows each and
2 accumulation steps see the same 16 rows per step as one process with 8 rows and 2 accumulation steps, and
the loss is the step's global answer-token mean: the losses at every step and the saved adapter must equal
the single-process run's (dropout off). Needs the ``deepspeed`` package (in the ``dev`` extra)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlora.adapters.state import ADAPTER_WEIGHTS
from tests.helpers.compose import run_cli
from tests.helpers.training import logged, train_tiny

pytest.importorskip("deepspeed")

RUN = [
    "debug=smoke",
    "train.max_steps=4",
    "train.log_every=1",
    "logger=none",
    "data.budget=128",
    "train.gradient_accumulation_steps=2",
    "adapter.dropout=0",
]
TWO_RANKS = [*RUN, "train.micro_batch_size=4"]
ONE_RANK = [*RUN, "train.micro_batch_size=8"]


def _ds_run(d: Path, overrides: list[str]) -> Path:
    r = run_cli([f"hydra.run.dir={d}", *overrides], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (d / "COMPLETED").exists() and (d / "train.rank1.log").exists()
    return d


def _assert_same_adapter(got_dir: Path, ref_dir: Path) -> None:
    """Same keys and shapes (complete, not ZeRO-3's empty partitions), the same values, lora_B trained."""
    got = load_file(str(got_dir / "adapter" / ADAPTER_WEIGHTS))
    ref = load_file(str(ref_dir / "adapter" / ADAPTER_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.numel() > 0 for v in got.values())
    assert all(bool(v.abs().sum() > 0) for k, v in got.items() if k.endswith("lora_B"))
    # relative to each tensor's norm: AdamW turns a gradient element near 0 into a ±lr step, so reduction-order
    # noise can move a single element by ~lr·1e-2 (one of 2048 in lora_B here); a missing or zero shard is ~1
    for k, v in got.items():
        assert float((v - ref[k]).norm() / ref[k].norm()) < 1e-3, k


def _final_eval(run_dir: Path) -> dict:
    lines = (run_dir / "metrics" / "eval.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("single"), "lora", ONE_RANK)


OFFLOAD = ["hardware.deepspeed.offload_optimizer=true", "hardware.deepspeed.offload_param=true"]


# the GPU presets' threshold: the tiny model's tensors all stay whole on every rank (a path of its own)
PERSIST = ["hardware.deepspeed.param_persistence_threshold=100000"]


@pytest.mark.parametrize(
    ("stage", "extra"),
    [(2, []), (3, []), (3, OFFLOAD), (3, PERSIST)],
    ids=["zero2", "zero3", "zero3-offload", "zero3-small-tensors-whole"],
)
def test_zero_on_two_cpu_ranks_equals_one_process(
    stage: int, extra: list[str], single_lora: Path, tmp_path: Path
) -> None:
    # held-out evaluation during training too (under ZeRO-3 every rank runs its forwards in lockstep)
    d = _ds_run(
        tmp_path / f"zero{stage}", [*TWO_RANKS, f"hardware=cpu2_zero{stage}", "eval.every_steps=2", *extra]
    )
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert meta["distributed"] == {"type": "DEEPSPEED", "zero_stage": stage}  # not silently plain DDP
    ds = json.loads((d / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 16
    assert ("offload_param" in ds["zero_optimization"]) == (extra == OFFLOAD)
    assert "--use_deepspeed" in (d / "launch_command.txt").read_text()
    assert logged(d) == pytest.approx(logged(single_lora), rel=1e-5)
    _assert_same_adapter(d, single_lora)
    assert [json.loads(x)["step"] for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()] == [2, 4]
    got, ref = _final_eval(d), _final_eval(single_lora)
    assert got["tasks"].keys() == ref["tasks"].keys() and got["micro"]["n"] == ref["micro"]["n"] > 0
    assert got["macro"] == pytest.approx(ref["macro"], rel=1e-4)


def test_zero3_injects_into_a_partitioned_pretrained_model(tmp_path: Path, single_lora: Path) -> None:
    """A pretrained model is loaded under ``zero.Init`` (partitioned before the adapters are injected):
    DoRA's magnitude init reads the gathered ``‖W0‖_row``, and training equals the single-process run."""
    pretrained = [
        "adapter=dora",
        "model.init=pretrained",
        f"model.hub_id={single_lora / 'base_model'}",  # the tiny base model saved by the reference run
    ]
    d = _ds_run(tmp_path / "zero3", [*TWO_RANKS, *pretrained, "hardware=cpu2_zero3"])
    ref = train_tiny(tmp_path, "single", [*ONE_RANK, *pretrained])
    meta, ref_meta = (json.loads((r / "meta.json").read_text()) for r in (d, ref))
    assert meta["parameters"] == ref_meta["parameters"]  # the partitioned base counted at full size
    assert logged(d) == pytest.approx(logged(ref), rel=1e-5)
    _assert_same_adapter(d, ref)


@pytest.mark.timeout(1200)  # three two-process runs
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_reproduces_the_losses(stage: int, single_lora: Path, tmp_path: Path) -> None:
    """Checkpoint at step 2 of 4 (DeepSpeed's partitioned optimizer state in ``deepspeed/``, the adapter whole),
    drop the later checkpoint as if the run had died, resume: the same losses and adapter as without a stop."""
    args = [*TWO_RANKS, f"hardware=cpu2_zero{stage}", "train.checkpoint_every=2"]
    d = _ds_run(tmp_path / "run", args)
    ckpt = d / "checkpoints" / "step_2"
    assert (ckpt / "deepspeed").is_dir() and not (ckpt / "optimizer.safetensors").exists()
    saved = load_file(str(ckpt / ADAPTER_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in load_file(str(single_lora / "adapter" / ADAPTER_WEIGHTS)).items()
    }
    full, full_adapter = logged(d), load_file(str(d / "adapter" / ADAPTER_WEIGHTS))
    shutil.rmtree(d / "checkpoints" / "step_4")
    (d / "COMPLETED").unlink()
    r = run_cli([f"hydra.run.dir={d}", *args, "resume=auto"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert [json.loads(x)["step"] for x in (d / "metrics" / "train.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert logged(d) == pytest.approx(full, rel=1e-6)
    for k, v in load_file(str(d / "adapter" / ADAPTER_WEIGHTS)).items():
        torch.testing.assert_close(v, full_adapter[k], atol=1e-6, rtol=1e-5)
    assert full == pytest.approx(logged(single_lora), rel=1e-5)
    # a DeepSpeed checkpoint is refused by a run without DeepSpeed (its optimizer state is partitioned)
    r = run_cli([f"hydra.run.dir={tmp_path / 'plain'}", *ONE_RANK, f"resume={ckpt}"], timeout=600)
    assert r.returncode != 0 and "saved with DeepSpeed and this config runs without it" in r.stdout + r.stderr
