"""Training runs of the tiny model in this process: loss regression and equivalences."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mtlora.procedures.finetune.recipe import run_training
from mtlora.training.watchdog import LossWatchdog, TrainingDiverged
from tests.helpers.compose import compose_train

BASE = ["debug=smoke", "train.max_steps=4", "eval=none", "data.budget=128", "train.log_every=1"]
# Fixed-seed reference (torch 2.13 CPU, tiny model, LoRA r=8, no dropout, 2x2 steps). A change here means
# the model, data order, init, loss or optimizer changed: update only for an intended change.
EXPECTED_LOSSES = [6.01687562231924, 5.639599886807528, 5.366186126460874, 5.314257635586504]


def logged(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics" / "train.jsonl").read_text().splitlines()
    ]


def _train(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    d = tmp_path / name
    d.mkdir()
    run_training(compose_train([*BASE, *overrides], run_dir=d), d)
    return d


def test_fixed_seed_loss_regression(tmp_path: Path) -> None:
    d = _train(tmp_path, "ref", ["adapter.dropout=0.0"])
    assert logged(d) == pytest.approx(EXPECTED_LOSSES, rel=1e-4)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    big = logged(_train(tmp_path, "big", ["adapter.dropout=0.0", "train.micro_batch_size=8"]))
    acc = logged(
        _train(
            tmp_path,
            "acc",
            ["adapter.dropout=0.0", "train.micro_batch_size=4", "train.gradient_accumulation_steps=2"],
        )
    )
    assert acc == pytest.approx(big, rel=1e-5)


def test_gradient_checkpointing_gives_the_samelogged(tmp_path: Path) -> None:
    plain = logged(_train(tmp_path, "plain", []))  # dropout on: recomputation must replay the same masks
    ckpt = logged(_train(tmp_path, "ckpt", ["train.gradient_checkpointing=true"]))
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_bf16_autocast_trains(tmp_path: Path) -> None:
    losses = logged(_train(tmp_path, "bf16", ["train.precision=bf16", "train.max_steps=8"]))
    assert all(math.isfinite(x) and x < 10 for x in losses)
    assert losses[-1] < losses[0]
    w = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in w.values()} == {"torch.float32"}  # adapter weights stay fp32


def test_loss_falls_and_heldout_improves(tmp_path: Path) -> None:
    d = _train(
        tmp_path,
        "learn",
        [
            "train.max_steps=80",
            "train.log_every=10",
            "eval=default",
            "eval.every_steps=40",
            "eval.max_examples_per_task=16",
            "data.budget=null",
        ],
    )
    losses = logged(d)
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [json.loads(x) for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [40, 80]
    assert set(evals[-1]["tasks"]) == {"arithmetic", "word_sorting", "boolean_expressions", "counting"}
    assert evals[-1]["macro"]["loss"] < evals[0]["macro"]["loss"]
    assert evals[-1]["macro"]["token_acc"] > 0.3


def test_watchdog_aborts_a_diverging_run(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged):
        _train(
            tmp_path,
            "boom",
            [
                "train.optimizer.lr=50.0",
                "train.max_grad_norm=null",
                "train.max_steps=30",
                "train.loss_watchdog.factor=1.2",
                "train.loss_watchdog.patience=2",
            ],
        )


def test_watchdog_rules() -> None:
    w = LossWatchdog(True, factor=2.0, patience=2)
    w.check_logged(1.0, 1)
    w.check_logged(2.5, 2)  # one strike
    w.check_logged(1.5, 3)  # reset
    w.check_logged(2.5, 4)
    with pytest.raises(TrainingDiverged, match="step 5"):
        w.check_logged(3.0, 5)
    with pytest.raises(TrainingDiverged, match="nan"):
        LossWatchdog(True, 2.0, 2).check_step(float("nan"), 7)
    LossWatchdog(False, 2.0, 1).check_step(float("nan"), 1)  # disabled: no error


def test_debug_overfit_drives_one_fixed_batch_towards_zero(tmp_path: Path) -> None:
    d = tmp_path / "overfit"
    d.mkdir()
    cfg = compose_train(["debug=overfit", "train.max_steps=100", "eval=none", "logger=none"], run_dir=d)
    run_training(cfg, d)
    losses = logged(d)
    assert losses[0] > 2.0 and losses[-1] < 0.2, losses


def test_tensorboard_logs_the_per_task_train_and_heldout_curves(tmp_path: Path) -> None:
    """logger=tensorboard (Accelerate's tracker): event files in <run_dir>/tensorboard with the training loss
    of every task at every logged step and the held-out metrics of every task at every evaluation."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = _train(
        tmp_path,
        "tb",
        ["logger=tensorboard", "eval=default", "eval.every_steps=2", "eval.max_examples_per_task=4"],
    )
    ea = EventAccumulator(str(d / "tensorboard"))
    ea.Reload()
    train = [json.loads(x) for x in (d / "metrics" / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()]
    for t in train[0]["task_loss"]:
        got = [(e.step, e.value) for e in ea.Scalars(f"train/task_loss/{t}")]
        assert got == [
            (r["step"], pytest.approx(r["task_loss"][t], rel=1e-6)) for r in train if t in r["task_loss"]
        ]
    for t in evals[0]["tasks"]:
        got = [(e.step, e.value) for e in ea.Scalars(f"eval/heldin/{t}/loss")]
        assert got == [(e["step"], pytest.approx(e["tasks"][t]["loss"], rel=1e-6)) for e in evals]
    assert [e.step for e in ea.Scalars("eval/heldin/macro/exact_match")] == [2, 4]


def test_a_stopped_default_run_resumes_with_the_same_losses(tmp_path: Path, monkeypatch) -> None:
    """Checkpoints are on by default (train.checkpoint_every=auto: every 10% of the steps): a run stopped
    right after a checkpoint continues with resume=auto and logs the losses of an uninterrupted run."""
    from mtlora.procedures.finetune import recipe as loop

    args = ["train.max_steps=20", "eval=none", "data.budget=128", "train.log_every=1", "logger=none"]
    ref = tmp_path / "ref"
    ref.mkdir()
    run_training(compose_train(args, run_dir=ref), ref)
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["step_18", "step_20"]

    class Stopped(Exception):
        pass

    save = loop.save_checkpoint

    def save_then_stop(path, *a, **k):
        save(path, *a, **k)
        if path.name == "step_10":
            raise Stopped

    d = tmp_path / "stopped"
    d.mkdir()
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Stopped):
        run_training(compose_train(args, run_dir=d), d)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert len(logged(d)) == 10
    run_training(compose_train([*args, "resume=auto"], run_dir=d), d)
    assert logged(d) == pytest.approx(logged(ref), rel=1e-6, abs=1e-7) and len(logged(d)) == 20


def test_mlflow_logs_per_task_metrics_into_one_run_continued_on_resume(tmp_path: Path) -> None:
    """logger=mlflow (optional package): one MLflow run per job with the per-task metrics; its id is kept in
    the run dir and a resumed job logs into the same run."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "eval=default", "eval.every_steps=2"]
    args += ["eval.max_examples_per_task=4", "train.checkpoint_every=1"]
    d = _train(tmp_path, "ml", args)
    run_id = (d / "mlflow_run_id.txt").read_text().strip()
    shutil.rmtree(d / "checkpoints" / "step_4")
    run_training(compose_train([*BASE, *args, "resume=auto"], run_dir=d), d)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    evals = [json.loads(x) for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()]
    for t in evals[0]["tasks"]:
        hist = {m.step: m.value for m in client.get_metric_history(run_id, f"eval/heldin/{t}/loss")}
        assert hist == {e["step"]: pytest.approx(e["tasks"][t]["loss"], rel=1e-6) for e in evals}
    assert {f"train/task_loss/{t}" for t in evals[0]["tasks"]} <= set(run.data.metrics)
