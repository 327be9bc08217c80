"""DeepSpeed ZeRO through Accelerate, configured from the ``hardware`` group (one source of truth).

:func:`deepspeed_config` builds the DeepSpeed dict from ``hardware.deepspeed`` and the ``train`` group with
integers only (no ``"auto"``: the loop passes no dataloader to ``prepare``); the Hydra process writes it as
``<run_dir>/deepspeed_config.json`` and every worker builds the same dict and hands it to
``DeepSpeedPlugin(hf_ds_config=...)``. The optimizer and LR scheduler stay in PyTorch (AdamW over the adapter
parameters); DeepSpeed does the clipping (``gradient_clipping`` = ``train.max_grad_norm``) and the step inside
``acc.backward`` on the last micro-batch of a step.

The helpers below are no-ops without DeepSpeed, so the loop has one code path:

* :func:`micro_batch_context`: ``acc.no_sync`` for DDP; under DeepSpeed it marks the gradient-accumulation
  boundary (Accelerate steps the engine in ``backward`` when ``sync_gradients`` is set);
* :func:`backward_kwargs`: the loop already normalises the loss of a whole step, so DeepSpeed must not divide
  it by the accumulation steps again (``scale_wrt_gas=False``);
* :func:`zero3_gathered`: under ZeRO-3 the parameters are partitioned (shape ``[0]`` outside a forward); the
  adapter is gathered on every rank before the main process saves it, so the saved adapter is complete;
* :func:`defer_main_process_eval`: the generation suites (``bbh``, ``heldin_gen``, ``mmlu``) run on the main
  process only, which under ZeRO-3 with several processes would wait forever for the other ranks' parameter
  shards, and how many forwards a generation takes depends on its outputs; there they are switched off with
  a warning (evaluate the saved adapter afterwards: ``python -m mtlora.evaluate``). The teacher-forced
  ``heldin`` suite has a fixed number of forwards: under ZeRO-3 every rank runs it in lockstep
  (:func:`eval_on_every_rank`) and the main process logs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

DEEPSPEED_CONFIG = "deepspeed_config.json"


def world_size(hw_cfg: DictConfig) -> int:
    """Processes over all machines (``hardware.num_processes`` is per machine)."""
    return int(hw_cfg.num_processes) * int(hw_cfg.get("num_machines") or 1)


def deepspeed_config(hw_cfg: DictConfig, train_cfg: DictConfig) -> dict[str, Any] | None:
    """The DeepSpeed config dict for ``hardware.deepspeed`` (None when it is null)."""
    ds = hw_cfg.get("deepspeed")
    if not ds:
        return None
    stage = int(ds.stage)
    bucket = int(ds.get("bucket_size") or 500_000_000)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(ds.get("overlap_comm", True)),
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
    }
    if stage == 2:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = bucket
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        threshold = ds.get("param_persistence_threshold")  # ignored at stage 2 (no partitioned parameters)
        zero["stage3_param_persistence_threshold"] = 100_000 if threshold is None else int(threshold)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3 and ds.get("offload_param"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    micro, ga = int(train_cfg.micro_batch_size), int(train_cfg.gradient_accumulation_steps)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "train_batch_size": micro * ga * world_size(hw_cfg),
        "gradient_clipping": float(train_cfg.max_grad_norm or 0.0),
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # the optimizer is the train group's (torch AdamW over the adapter), not DeepSpeed's own
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if ds.get("offload_optimizer"):  # a torch optimizer on offloaded (CPU) states: allowed, slower
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def write_deepspeed_config(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Write ``<run_dir>/deepspeed_config.json`` (nothing without DeepSpeed)."""
    ds = deepspeed_config(cfg.hardware, cfg.train)
    if ds is None:
        return None
    path = Path(run_dir) / DEEPSPEED_CONFIG
    path.write_text(json.dumps(ds, indent=2) + "\n")
    return path


def deepspeed_plugin(cfg: DictConfig):
    """``DeepSpeedPlugin(hf_ds_config=...)`` for ``cfg`` or None without ``hardware.deepspeed``."""
    ds = deepspeed_config(cfg.hardware, cfg.train)
    if ds is None:
        return None
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds)


def accelerator_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for the device and DeepSpeed settings of ``cfg.hardware``.

    DeepSpeed on the CPU (``hardware.device=cpu``, DeepSpeed's CPU accelerator) needs Accelerate's GPU code
    path with a gloo process group: ``cpu=True`` would silently drop the DeepSpeed plugin, and without an
    explicit backend Accelerate would see one process per rank."""
    plugin = deepspeed_plugin(cfg)
    on_cpu = cfg.hardware.device == "cpu"
    if plugin is None or not on_cpu:
        return {"cpu": on_cpu, "deepspeed_plugin": plugin}
    if torch.cuda.is_available():  # Accelerate would place the batches on the GPU, DeepSpeed the model not
        raise ConfigError(
            "hardware.device=cpu with hardware.deepspeed on a machine with a GPU: launch the workers with "
            "DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= (`python -m mtlora.train` does)"
        )
    from accelerate.utils import InitProcessGroupKwargs

    return {
        "cpu": False,
        "deepspeed_plugin": plugin,
        "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")],
    }


def uses_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def unwrap_model(acc, model: torch.nn.Module) -> torch.nn.Module:
    """``acc.unwrap_model(model)`` without importing DeepSpeed in runs that do not use it: Accelerate
    imports it whenever it is installed, and DeepSpeed then logs its accelerator choice ("Setting
    accelerator to CPU") in every plain run. Without DeepSpeed the wrappers are DDP / DataParallel (the
    decoder layers compile in place, ``train.compile``), each holding the model as ``.module``."""
    if uses_deepspeed(acc):
        return acc.unwrap_model(model)
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def zero_stage(acc) -> int:
    if not uses_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


@contextlib.contextmanager
def model_build_context(acc, model_cfg: DictConfig):
    """Context for building the base model. Under ZeRO-3 transformers builds models partitioned
    (``deepspeed.zero.Init``): right for a pretrained model (each rank holds its shard only), but a
    ``model.init=random`` model would draw other weights than on every other hardware setup (zero.Init
    initialises module by module on gathered parameters). A random-init model is therefore built whole and
    partitioned by ``prepare``, so that ``model.init_seed`` gives the same weights everywhere (and
    :func:`mtlora.load_run` rebuilds them). The cost: each rank holds the whole model in fp32 while it is
    built, e.g. 8 ranks x 28 GiB of host memory for a random 7B shape. (Accelerate's
    ``zero3_init_context_manager(enable=False)`` would be the API, but it re-registers the config with
    transformers, which then still uses zero.Init.)"""
    plugin = acc.state.deepspeed_plugin if zero_stage(acc) == 3 else None
    hf_config = getattr(plugin, "dschf", None)
    if hf_config is None or model_cfg.init != "random":
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def backward_kwargs(acc) -> dict[str, Any]:
    """Keyword arguments for ``acc.backward``: the step's loss is already normalised over its micro-batches,
    so DeepSpeed must not scale it by 1/gradient_accumulation_steps."""
    return {"scale_wrt_gas": False} if uses_deepspeed(acc) else {}


def micro_batch_context(acc, model, sync: bool):
    """Context for one micro-batch's forward/backward: ``acc.no_sync`` on all but the last micro-batch of a
    step (DDP); under DeepSpeed, mark whether this micro-batch ends the step (the engine then reduces the
    gradients, clips and steps inside ``acc.backward``)."""
    if uses_deepspeed(acc):
        acc.gradient_state._set_sync_gradients(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else acc.no_sync(model)


@contextlib.contextmanager
def zero3_gathered(acc, params: Iterable[torch.nn.Parameter], collective: bool = True):
    """Full (gathered) ``params`` inside the block under ZeRO-3; a no-op otherwise.

    Gathering is a collective: with ``collective`` (the default) every rank must enter the block. With
    ``collective=False`` (code that runs on the main process only) the parameters are gathered only when
    there is a single process, and left partitioned (with a warning) otherwise."""
    if zero_stage(acc) != 3:
        yield
        return
    if not collective and acc.num_processes > 1:
        log.warning("ZeRO-3 with %d processes: parameters left partitioned here", acc.num_processes)
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def generation_suites() -> tuple[str, ...]:
    """The registered evaluation suites that generate (a data-dependent number of forwards): main process only."""
    from mtlora.eval.suites import GENERATION, all_suites

    return tuple(s.name for s in all_suites() if s.mode == GENERATION)


def eval_on_every_rank(acc) -> bool:
    """Whether the teacher-forced evaluation must run on every rank: ZeRO-3 with several processes, where
    each forward gathers the partitioned weights (a collective)."""
    return zero_stage(acc) == 3 and acc.num_processes > 1


def defer_main_process_eval(cfg: DictConfig, acc) -> DictConfig:
    """``cfg`` without the generation suites under ZeRO-3 with several processes (see module doc)."""
    if not eval_on_every_rank(acc) or not cfg.eval.get("at_end"):
        return cfg
    suites = list(cfg.eval.get("suites") or [])
    generating = generation_suites()
    skipped = [s for s in suites if s in generating]
    if OmegaConf.select(cfg, "eval.samples.per_task", default=0):
        skipped.append("samples")  # the held-in samples (eval.samples) generate too
    if not skipped:
        return cfg
    if acc.is_main_process:
        log.warning(
            "ZeRO-3 over %d processes: the generation suites %s run on the main process only and would hang "
            "here; they are skipped. Evaluate the saved adapter afterwards with `python -m mtlora.evaluate`.",
            acc.num_processes,
            skipped,
        )
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        cfg.eval.suites = [s for s in suites if s not in generating]
        if "samples" in skipped:
            cfg.eval.samples.per_task = 0
    return cfg
