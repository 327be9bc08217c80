"""`python -m mtlora.train` as a user runs it: run dir contents, errors, resume after kill -9, DDP,
multirun, wandb offline."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.compose import REPO, run_cli
from tests.helpers.wandb_files import offline_runs

FAST = ["train.log_every=1", "logger=none"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics" / "train.jsonl").read_text().splitlines()]


def test_default_job_end_to_end(tmp_path: Path) -> None:
    d = tmp_path / "run"
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "train.max_steps=60",
            "train.log_every=10",
            "eval.max_examples_per_task=16",
            "logger=csv",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for rel in [
        "COMPLETED",
        "config_resolved.yaml",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "meta.json",
        "train.log",
        "metrics/train.jsonl",
        "metrics/train.csv",
        "metrics/per_task.csv",
        "metrics/eval_heldin.json",
        "metrics/eval_heldin.md",
        "plots/loss.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "base_model/config.json",
        "base_model/model.safetensors",
        "base_model/tokenizer/tokenizer.json",
    ]:
        assert (d / rel).exists(), rel
    assert not (d / "RUNNING").exists()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["parameters"]["trainable"] > 0
    assert meta["parameters"]["trainable"] < meta["parameters"]["total"]
    assert {"torch", "transformers", "accelerate"} <= set(meta["packages"]) and "command" in meta
    losses = _losses(d)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    rec = json.loads((d / "metrics" / "train.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens_per_s", "task_loss"} <= set(rec)
    rows = (d / "metrics" / "per_task.csv").read_text().splitlines()
    assert (
        rows[0].startswith("step,task,n,loss,token_acc,exact_match") and len(rows) == 1 + 10 * 4
    )  # 10 evals
    weights = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert weights and all(".lora_" in k for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not zero
    assert "held-out eval at step 60" in (d / "train.log").read_text()
    assert "| macro |" in r.stdout + r.stderr  # the per-task table is printed
    # the default job: held-out eval and checkpoints every 10% of the steps (eval.every_steps / train.checkpoint_every
    # = auto), so held-out loss is a curve and a stopped run can be resumed
    evals = [json.loads(x) for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == list(range(6, 61, 6))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_54", "step_60"]
    # train.log: one line per train.log_every with step, loss, lr, tokens/s and the loss of every task
    records = [json.loads(x) for x in (d / "metrics" / "train.jsonl").read_text().splitlines()]
    lines = [x for x in (d / "train.log").read_text().splitlines() if "] - step " in x]
    assert len(lines) == len(records) == 6
    for line, rec in zip(lines, records):
        assert (
            f"step {rec['step']}/60 | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} |" in line
            and "tok/s" in line
        )
        assert all(f"{t} {v:.4f}" in line for t, v in rec["task_loss"].items()) and len(rec["task_loss"]) == 4
    # train.csv: the per-task training loss as task_loss/<task> columns
    with (d / "metrics" / "train.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in csv_rows] == [r["step"] for r in records]
    for row, rec in zip(csv_rows, records):
        for t, v in rec["task_loss"].items():
            assert float(row[f"task_loss/{t}"]) == pytest.approx(v)


def test_bad_config_fails_fast_naming_the_key(tmp_path: Path) -> None:
    d = tmp_path / "run"
    r = run_cli([f"hydra.run.dir={d}", "adapter.rank=0", "train.optimizer.lr=-1"], timeout=120)
    assert r.returncode != 0
    assert "adapter.rank=0: must be an integer >= 1" in r.stderr
    assert "train.optimizer.lr=-1" in r.stderr
    assert not (d / "RUNNING").exists() and not (d / "meta.json").exists()


def test_bad_data_row_names_file_and_row(tmp_path: Path) -> None:
    bad = tmp_path / "dolly.jsonl"
    rows = [{"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"}] * 5
    rows.append({"instruction": "Broken", "context": "", "response": "", "category": "open_qa"})
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tmp_path / "run"
    args = [
        f"hydra.run.dir={d}",
        "data=dolly",
        "data.source.type=json",
        f"+data.source.data_files={bad}",
        "data.select=[open_qa]",
        "train.max_steps=1",
        *FAST,
    ]
    r = run_cli(args, timeout=300)
    assert r.returncode != 0
    assert f"row 5 of {bad}" in r.stderr and "response" in r.stderr
    assert (d / "FAILED").exists()


def test_run_dir_is_not_reused_without_resume(tmp_path: Path) -> None:
    d = tmp_path / "run"
    assert run_cli([f"hydra.run.dir={d}", "train.max_steps=1", "eval=none", *FAST]).returncode == 0
    r = run_cli([f"hydra.run.dir={d}", "train.max_steps=1", "eval=none", *FAST])
    assert r.returncode != 0 and "already holds a run" in r.stderr


def test_kill_9_then_resume_auto_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    # killed after the step-20 checkpoint: 40 more steps leave the poll below ample time to kill it mid-run
    args = ["train.max_steps=60", "train.checkpoint_every=10", "eval=none", "data.budget=null", *FAST]
    ref = tmp_path / "ref"
    assert run_cli([f"hydra.run.dir={ref}", *args]).returncode == 0

    d = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "mtlora.train", f"hydra.run.dir={d}", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (d / "checkpoints" / "step_20").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (d / "RUNNING").exists() and not (d / "COMPLETED").exists()
    logged_before = len(_losses(d))

    r = run_cli([f"hydra.run.dir={d}", *args, "resume=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert (d / "COMPLETED").exists()
    resumed, reference = _losses(d), _losses(ref)
    assert len(resumed) == len(reference) == 60 and logged_before >= 20
    assert resumed == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_resume_with_a_changed_config_warns_and_keeps_the_earlier_config(tmp_path: Path) -> None:
    d = tmp_path / "run"
    args = [f"hydra.run.dir={d}", "train.max_steps=2", "train.checkpoint_every=1", "eval=none", *FAST]
    assert run_cli(args).returncode == 0
    r = run_cli([*args, "adapter.dropout=0.2", "resume=auto"])
    assert r.returncode == 0 and "differs from the one it started with" in r.stdout + r.stderr
    assert "dropout: 0.05" in (d / "config_resolved.before_resume.yaml").read_text()
    assert "dropout: 0.2" in (d / "config_resolved.yaml").read_text()
    r = run_cli([*args, "adapter.dropout=0.2", "resume=auto"])  # same config, COMPLETED: nothing to do
    assert r.returncode == 0 and "differs" not in r.stdout + r.stderr
    assert "already COMPLETED with this config; nothing to resume" in r.stdout
    assert len(json.loads((d / "meta.json").read_text())["resumes"]) == 1


def test_sigterm_ends_the_run_with_a_failed_marker(tmp_path: Path) -> None:
    d = tmp_path / "term"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtlora.train",
            f"hydra.run.dir={d}",
            "train.max_steps=5000",
            "eval=none",
            *FAST,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (d / "metrics" / "train.jsonl").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) != 0
    assert (d / "FAILED").exists() and not (d / "RUNNING").exists()
    assert "SystemExit(143)" in (d / "FAILED").read_text()


def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    d = tmp_path / "ddp"
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "hardware=cpu_ddp2",
            "train.max_steps=3",
            "eval.max_examples_per_task=4",
            "train.micro_batch_size=4",
            "adapter.dropout=0.0",
            *FAST,
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert (d / "train.rank1.log").exists() and (d / "COMPLETED").exists()
    assert "--multi_gpu" in (d / "launch_command.txt").read_text()
    # 2 ranks x 4 rows see the same 8 examples per step as one process with 8 rows, and the loss is the
    # global answer-token mean: same losses at every step (not only before the first update)
    single = tmp_path / "single"
    r = run_cli(
        [
            f"hydra.run.dir={single}",
            "train.max_steps=3",
            "eval=none",
            "train.micro_batch_size=8",
            "adapter.dropout=0.0",
            *FAST,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(d) == pytest.approx(_losses(single), rel=1e-5)


def test_ddp_resume_mid_log_interval_reproduces_the_losses(tmp_path: Path) -> None:
    """Checkpoint at step 3 with a log every 2 steps: each rank's partial logging sums must be restored."""
    args = [
        "hardware=cpu_ddp2",
        "train.max_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.micro_batch_size=4",
        "eval=none",
        "logger=none",
    ]
    ref, d = tmp_path / "ref", tmp_path / "resumed"
    assert run_cli([f"hydra.run.dir={ref}", *args], timeout=600).returncode == 0
    assert run_cli([f"hydra.run.dir={d}", *args], timeout=600).returncode == 0
    shutil.rmtree(d / "checkpoints" / "step_6")  # as if the run had died after step 5
    (d / "COMPLETED").unlink()
    r = run_cli([f"hydra.run.dir={d}", *args, "resume=auto"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "step_3" in r.stdout + r.stderr
    assert [json.loads(x)["step"] for x in (d / "metrics" / "train.jsonl").read_text().splitlines()] == [
        2,
        4,
        6,
    ]
    assert _losses(d) == pytest.approx(_losses(ref), rel=1e-6)


def test_multirun_gives_one_run_dir_per_job(tmp_path: Path) -> None:
    r = run_cli(
        ["-m", "adapter.rank=2,4", "train.max_steps=2", "eval=none", *FAST],
        env={"MTLORA_OUTPUT_DIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    done = sorted(tmp_path.glob("train/multiruns/*/*/COMPLETED"))
    assert len(done) == 2
    ranks = []
    for c in done:
        w = load_file(str(c.parent / "adapter" / "adapter_model.safetensors"))
        ranks.append(next(v.shape[0] for k, v in w.items() if k.endswith("lora_A")))
    assert sorted(ranks) == [2, 4]
    assert done[0].parent != done[1].parent


def test_wandb_offline_one_run_per_job_with_per_task_metrics_continued_on_resume(tmp_path: Path) -> None:
    """logger=wandb_offline: exactly one wandb run, holding the training loss and the held-out metrics of every
    task at the steps they were measured (the values of metrics/*.jsonl); a resumed job continues that run."""
    d = tmp_path / "run"
    args = [
        f"hydra.run.dir={d}",
        "logger=wandb_offline",
        "train.max_steps=4",
        "eval.every_steps=2",
        "eval.max_examples_per_task=4",
        "train.log_every=1",
    ]
    r = run_cli(args, env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((d / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_id = (d / "wandb_id.txt").read_text().strip()
    assert run_id in runs[0].name
    rows = offline_runs(d)[run_id]["rows"]
    tasks = ["arithmetic", "word_sorting", "boolean_expressions", "counting"]
    metrics = ["loss", "token_acc", "exact_match"]
    evals = [json.loads(x) for x in (d / "metrics" / "eval.jsonl").read_text().splitlines()]
    logged = {
        row["_step"]: row for row in rows if "eval/heldin/arithmetic/loss" in row
    }  # one log call per evaluation
    assert sorted(logged) == [e["step"] for e in evals] == [2, 4]
    for e in evals:
        for t in tasks:
            for m in metrics:
                assert logged[e["step"]][f"eval/heldin/{t}/{m}"] == pytest.approx(e["tasks"][t][m]), (t, m)
        for m in metrics:
            assert logged[e["step"]][f"eval/heldin/macro/{m}"] == pytest.approx(e["macro"][m])
    train = {row["_step"]: row for row in rows if "train/loss" in row}
    for rec in map(json.loads, (d / "metrics" / "train.jsonl").read_text().splitlines()):
        for t, v in rec["task_loss"].items():
            assert train[rec["step"]][f"train/task_loss/{t}"] == pytest.approx(v)

    # as if killed after step 3 (no step_4 checkpoint, no COMPLETED marker): resume=auto continues the wandb run
    shutil.rmtree(d / "checkpoints" / "step_4")
    (d / "COMPLETED").unlink()
    r = run_cli([*args, "resume=auto"], env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((d / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in p.name for p in runs), runs
    assert (d / "wandb_id.txt").read_text().strip() == run_id


@pytest.mark.slow
def test_direct_accelerate_launch_needs_and_uses_an_explicit_run_dir(tmp_path: Path) -> None:
    base = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "mtlora.train",
        "train.max_steps=2",
        "eval=none",
        "hardware.num_threads=1",
        *FAST,
    ]
    r = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs an explicit hydra.run.dir" in r.stderr
    d = tmp_path / "direct"
    r = subprocess.run([*base, f"hydra.run.dir={d}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((d / "meta.json").read_text())["world_size"] == 2
    assert (d / ".hydra").is_dir() and (d / "COMPLETED").exists()
    assert not [
        p.name for p in d.iterdir() if "rank1" in p.name or ".pending-" in p.name
    ]  # rank 0 writes them
