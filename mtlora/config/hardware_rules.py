"""Rules of the ``hardware`` group: device, processes and launcher, multi-node keys and DeepSpeed
(conf/hardware/gpu*_zero*.yaml, cpu2_zero*.yaml, multinode.yaml)."""

from __future__ import annotations

from omegaconf import DictConfig

from mtlora.config.checker import Checker
from mtlora.config.cross_rules import check_deepspeed_combinations


def check_hardware(c: Checker, cfg: DictConfig) -> None:
    c.choice("hardware.device", ("cpu", "cuda"))
    c.int_("hardware.num_processes", 1)
    c.choice("hardware.launcher", ("none", "accelerate"))
    if cfg.hardware.get("num_processes", 1) > 1 and cfg.hardware.get("launcher") != "accelerate":
        c.errors.append("hardware.launcher: must be 'accelerate' when hardware.num_processes > 1")
    check_machines(c, cfg)
    check_deepspeed(c, cfg)


def check_machines(c: Checker, cfg: DictConfig) -> None:
    """Multi-node keys: the rank, address and port of the main machine when there are several."""
    hw = cfg.hardware
    machines = hw.get("num_machines") or 1
    if hw.get("num_machines") is not None:
        c.int_("hardware.num_machines", 1)
    if isinstance(machines, int) and machines > 1:
        c.int_("hardware.machine_rank", 0)
        c.int_("hardware.main_process_port", 1)
        c.rule("hardware.main_process_ip", lambda v: isinstance(v, str) and bool(v), "a host name or address")
        rank = hw.get("machine_rank")
        if isinstance(rank, int) and rank >= machines:
            c.errors.append(f"hardware.machine_rank={rank}: must be < hardware.num_machines={machines}")
        if hw.get("launcher") != "accelerate":
            c.errors.append("hardware.launcher: must be 'accelerate' when hardware.num_machines > 1")


def check_deepspeed(c: Checker, cfg: DictConfig) -> None:
    """``hardware.deepspeed`` (ZeRO stage, offloading, buckets) when set, and what it excludes."""
    hw = cfg.hardware
    ds = hw.get("deepspeed")
    if not ds:
        return
    c.choice("hardware.deepspeed.stage", (2, 3))
    for key in ("offload_optimizer", "offload_param", "overlap_comm"):
        if ds.get(key) is not None:
            c.bool_(f"hardware.deepspeed.{key}")
    c.int_("hardware.deepspeed.bucket_size", 1, optional=True)
    if ds.get("param_persistence_threshold") is not None:
        c.int_("hardware.deepspeed.param_persistence_threshold", 0)
    if ds.get("offload_param") and ds.get("stage") != 3:
        c.errors.append("hardware.deepspeed.offload_param: needs stage 3 (ZeRO-2 partitions no parameters)")
    if hw.get("launcher") != "accelerate":
        c.errors.append("hardware.deepspeed: needs hardware.launcher=accelerate")
    check_deepspeed_combinations(c, cfg)
