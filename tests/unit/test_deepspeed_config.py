"""DeepSpeed config generation from the hardware group, and every hardware preset composes and validates."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from accelerate.utils import DistributedType
from omegaconf import OmegaConf

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.training.deepspeed import (
    DEEPSPEED_CONFIG,
    accelerator_kwargs,
    backward_kwargs,
    deepspeed_config,
    defer_main_process_eval,
    eval_on_every_rank,
    micro_batch_context,
    write_deepspeed_config,
    zero3_gathered,
)
from tests.helpers.compose import CONF, compose_train

PRESETS = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))
TRAIN = OmegaConf.create(
    {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, "precision": "bf16"}
)


def _hw(name: str):
    return OmegaConf.load(CONF / "hardware" / f"{name}.yaml")


def test_no_deepspeed_gives_none():
    for name in ("cpu", "gpu1", "gpu8_ddp"):
        assert deepspeed_config(_hw(name), TRAIN) is None


def test_zero2_one_gpu_dict():
    assert deepspeed_config(_hw("gpu1_zero2"), TRAIN) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 8,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 500_000_000,
            "allgather_partitions": True,
            "allgather_bucket_size": 500_000_000,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def test_zero3_eight_gpus_gathers_16bit_on_save():
    ds = deepspeed_config(_hw("gpu8_zero3"), TRAIN)
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 500_000_000,
        "stage3_prefetch_bucket_size": 500_000_000,
        "stage3_param_persistence_threshold": 100_000,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert "zero_force_ds_cpu_optimizer" not in ds


def test_cpu_zero3_partitions_every_parameter():
    z = deepspeed_config(_hw("cpu2_zero3"), TRAIN)["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0
    assert deepspeed_config(_hw("cpu2_zero2"), TRAIN)["train_batch_size"] == 4 * 2 * 2
    # a ZeRO-3 preset switched to stage 2 keeps validating; the threshold has no meaning there
    cfg = compose_train(["hardware=gpu8_zero3", "hardware.deepspeed.stage=2"])
    validate_config(cfg)
    assert (
        "stage3_param_persistence_threshold"
        not in deepspeed_config(cfg.hardware, cfg.train)["zero_optimization"]
    )


def test_accelerator_kwargs_keep_deepspeed_on_the_cpu():
    """Accelerate's ``cpu=True`` drops the DeepSpeed plugin (a plain MULTI_CPU run would follow): DeepSpeed on
    the CPU goes through the non-CPU path with a gloo process group."""
    kw = accelerator_kwargs(compose_train(["hardware=cpu2_zero3"]))
    assert kw["cpu"] is False and kw["deepspeed_plugin"].zero_stage == 3
    assert [h.backend for h in kw["kwargs_handlers"]] == ["gloo"]
    assert accelerator_kwargs(compose_train(["hardware=cpu_ddp2"])) == {"cpu": True, "deepspeed_plugin": None}
    gpu = accelerator_kwargs(compose_train(["hardware=gpu1_zero2"]))
    assert gpu["cpu"] is False and gpu["deepspeed_plugin"].zero_stage == 2 and "kwargs_handlers" not in gpu


def test_cpu_deepspeed_with_a_visible_gpu_is_refused(monkeypatch):
    """Workers launched by hand on a GPU machine without the CPU environment (mtlora.launcher.launch sets it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="):
        accelerator_kwargs(compose_train(["hardware=cpu2_zero2"]))


def test_zero3_offload_and_fp32_without_clipping():
    train = OmegaConf.merge(TRAIN, {"precision": "fp32", "max_grad_norm": None})
    ds = deepspeed_config(_hw("gpu8_zero3_offload"), train)
    z = ds["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 0.0


def test_multinode_env_resolution(monkeypatch):
    env = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8"}
    env |= {"MASTER_ADDR": "node001", "MASTER_PORT": "29611"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = compose_train(["hardware=multinode"])
    hw = cfg.hardware
    assert (hw.num_machines, hw.machine_rank, hw.num_processes) == (4, 2, 8)
    assert (hw.main_process_ip, hw.main_process_port) == ("node001", 29611)
    assert (
        deepspeed_config(hw, cfg.train)["train_batch_size"]
        == int(cfg.train.micro_batch_size) * int(cfg.train.gradient_accumulation_steps) * 32
    )
    validate_config(cfg)


def test_multinode_defaults_without_slurm(monkeypatch):
    for k in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_GPUS_ON_NODE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    hw = compose_train(["hardware=multinode"]).hardware
    assert (hw.num_machines, hw.machine_rank, hw.num_processes) == (1, 0, 8)
    assert (hw.main_process_ip, hw.main_process_port) == ("127.0.0.1", 29500)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_validates(name, monkeypatch):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    cfg = compose_train([f"hardware={name}"])
    validate_config(cfg)


def test_written_config_matches(tmp_path):
    cfg = compose_train(["hardware=gpu1_zero3"])
    path = write_deepspeed_config(cfg, tmp_path)
    assert path == tmp_path / DEEPSPEED_CONFIG
    assert json.loads(path.read_text()) == deepspeed_config(cfg.hardware, cfg.train)
    assert write_deepspeed_config(compose_train(["hardware=gpu1"]), tmp_path / "x") is None


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        (["hardware=gpu1_zero2", "hardware.deepspeed.stage=1"], "hardware.deepspeed.stage"),
        (["hardware=gpu1_zero2", "hardware.deepspeed.offload_param=true"], "needs stage 3"),
        (["hardware=gpu1_zero2", "hardware.launcher=none"], "needs hardware.launcher=accelerate"),
        (["hardware=cpu2_zero3", "hardware.deepspeed.param_persistence_threshold=-1"], "integer >= 0"),
        (["hardware=gpu1_zero3", "++train.loss.impl=chunked"], "must be 'full' under ZeRO-3"),
        (["hardware=multinode", "hardware.num_machines=2", "hardware.machine_rank=2"], "machine_rank=2"),
    ],
)
def test_invalid_hardware(over, msg):
    with pytest.raises(ConfigError, match=msg):
        validate_config(compose_train(over))


class _FakeGradState:
    def __init__(self):
        self.sync_gradients = True

    def _set_sync_gradients(self, v):
        self.sync_gradients = v


class _FakeAcc:
    """Just the attributes the loop helpers read."""

    def __init__(self, distributed_type, stage=None, num_processes=1):
        from types import SimpleNamespace

        self.distributed_type = distributed_type
        self.num_processes = num_processes
        self.gradient_state = _FakeGradState()
        ds = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
        self.state = SimpleNamespace(deepspeed_plugin=ds)
        self.no_sync_calls = 0

    def no_sync(self, model):
        self.no_sync_calls += 1
        return contextlib.nullcontext()


def test_loop_helpers_without_deepspeed_are_the_ddp_path():
    acc = _FakeAcc(DistributedType.MULTI_GPU)
    assert backward_kwargs(acc) == {}
    with micro_batch_context(acc, None, sync=False):
        pass
    with micro_batch_context(acc, None, sync=True):
        pass
    assert acc.no_sync_calls == 1 and acc.gradient_state.sync_gradients is True
    p = torch.nn.Parameter(torch.ones(2))
    with zero3_gathered(acc, [p]):  # no-op: nothing imported, nothing changed
        assert p.shape == (2,)


def test_loop_helpers_under_deepspeed_mark_the_accumulation_boundary():
    acc = _FakeAcc(DistributedType.DEEPSPEED, stage=2)
    assert backward_kwargs(acc) == {"scale_wrt_gas": False}  # the loop normalises the step's loss itself
    with micro_batch_context(acc, None, sync=False):
        assert acc.gradient_state.sync_gradients is False  # acc.backward: no engine.step yet
    with micro_batch_context(acc, None, sync=True):
        assert acc.gradient_state.sync_gradients is True  # last micro-batch: engine.step in acc.backward
    assert acc.no_sync_calls == 0
    with zero3_gathered(acc, []):  # ZeRO-2: parameters are not partitioned, nothing to gather
        pass
    # ZeRO-3, main-process-only code with several processes: left partitioned (no collective, no hang)
    with zero3_gathered(_FakeAcc(DistributedType.DEEPSPEED, stage=3, num_processes=2), [], collective=False):
        pass


def test_multi_process_zero3_skips_only_the_generation_suites():
    """The teacher-forced heldin suite runs on every rank in lockstep; generation suites are skipped."""
    cfg = compose_train(["hardware=gpu8_zero3", "eval.every_steps=2", "eval.suites=[heldin,bbh,mmlu]"])
    acc = _FakeAcc(DistributedType.DEEPSPEED, stage=3, num_processes=8)
    acc.is_main_process = True
    assert eval_on_every_rank(acc)
    out = defer_main_process_eval(cfg, acc)
    assert list(out.eval.suites) == ["heldin"] and out.eval.at_end is True and out.eval.every_steps == 2
    assert out.eval.samples.per_task == 0  # the held-in samples generate too
    assert list(cfg.eval.suites) == ["heldin", "bbh", "mmlu"]  # the caller's config is left alone
    assert cfg.eval.samples.per_task == 3
    heldin_only = compose_train(["hardware=gpu8_zero3", "eval.samples.per_task=0"])
    assert defer_main_process_eval(heldin_only, acc) is heldin_only
    for other in (
        _FakeAcc(DistributedType.DEEPSPEED, stage=3),
        _FakeAcc(DistributedType.DEEPSPEED, stage=2, num_processes=8),
    ):
        assert not eval_on_every_rank(other)
        assert defer_main_process_eval(cfg, other) is cfg  # one process, or ZeRO-2: evaluation as usual
