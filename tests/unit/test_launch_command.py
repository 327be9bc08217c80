"""The `accelerate launch` argv that mtlora.launcher.launch builds for each hardware preset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mtlora.launcher.launch import worker_command, worker_env
from tests.helpers.compose import compose_train

RUN = Path("/runs/x")


def _argv(over, monkeypatch=None) -> list[str]:
    cmd = worker_command(compose_train(over), RUN)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[-3:] == ["-m", "mtlora.launcher.worker", str(RUN)]
    return cmd[3:-3]


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def _strip_port(argv):
    i = argv.index("--main_process_port")
    assert int(argv[i + 1]) > 0
    return argv[:i] + argv[i + 2 :]


def test_cpu_ddp2():
    argv = _strip_port(_argv(["hardware=cpu_ddp2"]))
    assert argv == [
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--multi_gpu", "--num_cpu_threads_per_process", "1",
    ]  # fmt: skip


def test_gpu8_ddp_bf16():
    argv = _strip_port(_argv(["hardware=gpu8_ddp", "train.precision=bf16"]))
    assert argv == [
        "--num_processes", "8", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--multi_gpu",
    ]  # fmt: skip


def test_gpu1_zero2_uses_deepspeed():
    argv = _strip_port(_argv(["hardware=gpu1_zero2", "train.precision=bf16"]))
    assert argv == [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--use_deepspeed",
    ]  # fmt: skip


def test_cpu2_zero3_uses_deepspeed_on_the_cpu_accelerator():
    cfg = compose_train(["hardware=cpu2_zero3"])
    argv = _strip_port(_argv(["hardware=cpu2_zero3"]))
    assert argv == [
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--use_deepspeed", "--num_cpu_threads_per_process", "1",
    ]  # fmt: skip
    env = worker_env(cfg, {"WORLD_SIZE": "8", "PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }


def test_worker_env_leaves_the_accelerator_to_deepspeed_on_gpus():
    for hw in ("gpu1_zero3", "cpu_ddp2"):
        assert "DS_ACCELERATOR" not in worker_env(compose_train([f"hardware={hw}"]), {})


def test_gpu8_zero3_no_multi_gpu_flag():
    argv = _argv(["hardware=gpu8_zero3"])
    assert "--use_deepspeed" in argv and "--multi_gpu" not in argv
    assert _flag(argv, "--num_processes") == "8"


def test_multinode_from_environment(monkeypatch):
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"}
    env |= {"MASTER_ADDR": "gpu-a17", "MASTER_PORT": "29611"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = _argv(["hardware=multinode", "train.precision=bf16"])
    assert argv == [
        "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "gpu-a17",
        "--main_process_port", "29611", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--use_deepspeed", "--deepspeed_multinode_launcher", "standard",
    ]  # fmt: skip


def test_multinode_ddp(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    argv = _argv(["hardware=multinode", "hardware.deepspeed=null"])
    assert "--multi_gpu" in argv and "--use_deepspeed" not in argv
    assert _flag(argv, "--num_processes") == "16"


def test_secondary_machine_waits_for_machine_0_then_starts_its_workers(tmp_path, monkeypatch) -> None:
    """machine_rank > 0 never claims the shared run dir: it waits for machine 0's resolved config."""
    import threading

    from omegaconf import OmegaConf

    import mtlora.train as train

    cfg = OmegaConf.create({"hardware": {"machine_rank": 1, "device": "cpu"}})
    started: list[Path] = []
    monkeypatch.setattr(train, "preflight", lambda c: None)
    monkeypatch.setattr(train, "spawn_workers", lambda c, d: started.append(d) or 0)
    with pytest.raises(RuntimeError, match="did not write"):
        train.run_secondary_machine(cfg, tmp_path, timeout_s=0.05, poll_s=0.01)
    assert not started and not (tmp_path / "RUNNING").exists()
    threading.Timer(0.05, lambda: (tmp_path / train.RESOLVED_CONFIG).write_text("x: 1\n")).start()
    train.run_secondary_machine(cfg, tmp_path, timeout_s=5, poll_s=0.01)
    assert started == [tmp_path] and not (tmp_path / "RUNNING").exists()
