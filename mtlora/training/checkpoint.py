"""Resumable checkpoints written as safetensors + JSON only (nothing is unpickled on load).

``checkpoints/step_N/`` holds

* ``adapter_model.safetensors``: the trainable parameters;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensor state by ``state.<param>.<key>``,
  and its param groups / non-tensor state;
* ``scheduler.json``: the LR scheduler's ``state_dict``;
* ``rng_rank<R>.safetensors`` + ``rng_rank<R>.json``: torch (CPU and CUDA), NumPy and Python RNG states
  of each rank (dropout must continue identically), and the rank's own state (e.g. its logging sums);
* ``trainer_state.json``: step, data position ``(epoch, batch)``, logging accumulators, watchdog state.

Accelerate's ``save_state`` pickles the optimizer and RNG states, which is why it is not used here.
Under DeepSpeed ZeRO the optimizer state is partitioned over the ranks (and, under ZeRO-3, so are the fp32
adapter weights): there ``deepspeed/`` holds DeepSpeed's own checkpoint of the trainable state
(``engine.save_checkpoint``, every rank writes its partition), instead of the ``optimizer.*`` files. The
adapter is still written whole as ``adapter_model.safetensors``, and its names and shapes are checked
against the model before DeepSpeed loads its (unnamed, flat) partitions. DeepSpeed's files are pickles
(``torch.save``; DeepSpeed loads them with ``torch.load(weights_only=False)``): resume a ZeRO run only from
checkpoints you trust, such as your own runs'.
A checkpoint is written to ``step_N.tmp`` and renamed when complete, so a killed run never leaves a
half-written ``step_N``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mtlora.adapters.state import (
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    check_adapter_fits,
    load_adapter_state_dict,
)
from mtlora.errors import IntegrityError
from mtlora.run.checksums import verify, write_manifest
from mtlora.run.layout import RunLayout

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
#: the ``tag`` (sub-directory) of DeepSpeed's checkpoint inside ``step_N/`` (ZeRO runs)
DEEPSPEED_TAG = "deepspeed"
_STEP_DIR = re.compile(r"step_(\d+)")


def _optimizer_to_files(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{pid}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "extra_state": extra}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["extra_state"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    ckpt_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    rank: int,
    is_main: bool,
    barrier=lambda: None,
    rank_state: dict | None = None,
    engine: Any = None,
    gathered: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Path:
    """Write a checkpoint (every rank calls this; rank-specific RNG/state files, shared files from rank 0).

    ``engine``: the DeepSpeed engine of a ZeRO run (its partitioned trainable state goes to ``deepspeed/``);
    ``gathered``: a context in which the adapter's parameters are whole (ZeRO-3: a collective, entered by
    every rank)."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_t, rng_m = _rng_state()
    save_file(rng_t, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps({**rng_m, "rank_state": rank_state or {}}))
    if engine is not None:  # a collective: every rank writes its partition
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True, save_latest=False)
    with gathered():
        if is_main:
            save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS))
    if is_main:
        if engine is None:
            opt_t, opt_m = _optimizer_to_files(optimizer.state_dict())
            save_file(opt_t, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_m))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    barrier()
    if is_main:
        write_manifest(tmp)  # SHA-256 of every file of every rank, checked on resume
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        tmp.rename(ckpt_dir)
    barrier()
    return ckpt_dir


def load_checkpoint(
    ckpt_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    engine: Any = None,
) -> dict:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG; return the trainer state, with this
    rank's own state under ``"rank_state"``. With a DeepSpeed ``engine`` the adapter weights and the optimizer
    come from DeepSpeed's checkpoint (a collective; the same world size and ZeRO stage as the saving run)."""
    if engine is not None:
        if not (ckpt_dir / DEEPSPEED_TAG).is_dir():
            raise FileNotFoundError(
                f"{ckpt_dir}: no {DEEPSPEED_TAG}/ checkpoint (saved without DeepSpeed); resume it with the "
                "hardware preset it was trained with"
            )
        # DeepSpeed restores flat partitions without names: check that the saved adapter fits this model first
        check_adapter_fits(model, {k: v.shape for k, v in load_file(str(ckpt_dir / ADAPTER_WEIGHTS)).items()})
        path, _ = engine.load_checkpoint(
            str(ckpt_dir),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,  # the frozen base is not in the checkpoint
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # the scheduler is ours (scheduler.json)
        )
        if path is None:
            raise RuntimeError(f"{ckpt_dir / DEEPSPEED_TAG}: DeepSpeed could not load this checkpoint")
    else:
        if (ckpt_dir / DEEPSPEED_TAG).is_dir():
            raise FileNotFoundError(
                f"{ckpt_dir}: a DeepSpeed checkpoint (its optimizer state is partitioned); resume it with the "
                "DeepSpeed hardware preset it was trained with"
            )
        load_adapter_state_dict(model, load_file(str(ckpt_dir / ADAPTER_WEIGHTS)))
        opt_meta = json.loads((ckpt_dir / "optimizer.json").read_text())
        optimizer.load_state_dict(
            _optimizer_from_files(load_file(str(ckpt_dir / "optimizer.safetensors")), opt_meta)
        )
    scheduler.load_state_dict(json.loads((ckpt_dir / "scheduler.json").read_text()))
    rng_file = ckpt_dir / f"rng_rank{rank}.safetensors"
    rank_meta: dict = {}
    if rng_file.exists():
        rank_meta = json.loads((ckpt_dir / f"rng_rank{rank}.json").read_text())
        _set_rng_state(load_file(str(rng_file)), rank_meta)
    return {
        **json.loads((ckpt_dir / TRAINER_STATE).read_text()),
        "rank_state": rank_meta.get("rank_state", {}),
    }


def adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a safetensors file, read from its header (no tensor data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def check_checkpoint_fits(cfg: Any, ckpt_dir: Path) -> None:
    """Raise :class:`~mtlora.errors.ConfigError` when the checkpoint ``ckpt_dir`` cannot be resumed with
    ``cfg``: its adapter tensors (names, shapes) differ from those ``cfg`` injects into its model (built on
    the meta device: no weights), or it was saved with(out) DeepSpeed and ``cfg`` runs without (with) it.
    Reads file headers only; nothing is written."""
    import torch as _torch

    from mtlora.adapters import inject_adapters
    from mtlora.adapters.state import check_adapter_fits
    from mtlora.errors import ConfigError
    from mtlora.models.factory import meta_model

    ds_ckpt, ds_cfg = (ckpt_dir / DEEPSPEED_TAG).is_dir(), bool(cfg.hardware.get("deepspeed"))
    if ds_ckpt != ds_cfg:
        raise ConfigError(
            f"resume={cfg.get('resume')}: {ckpt_dir} was saved {'with' if ds_ckpt else 'without'} DeepSpeed "
            f"and this config runs {'with' if ds_cfg else 'without'} it; resume with the hardware preset it "
            "was trained with"
        )
    if cfg.model.get("arch") is None:
        return  # no meta model to compare with; load_checkpoint checks the shapes
    model = meta_model(cfg.model)
    with _torch.device("meta"):
        inject_adapters(model, cfg.adapter)
    try:
        check_adapter_fits(model, adapter_shapes(ckpt_dir / ADAPTER_WEIGHTS))
    except ConfigError as e:
        raise ConfigError(
            f"resume={cfg.get('resume')}: the checkpoint {ckpt_dir} does not fit this config: {e}; resume with "
            "the model and adapter config it was trained with (its run dir's config_resolved.yaml)"
        ) from e


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = RunLayout(run_dir).checkpoints
    if not root.is_dir():
        return []
    # exactly ``step_<int>``: skips ``step_N.tmp`` (an interrupted save) and any other dir a user put there
    # (``step_best``, ``step_3_copy``), which would otherwise crash the sort or pass for step N
    done = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).exists():
            done.append((int(m.group(1)), p))
    return [p for _, p in sorted(done)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest intact one in ``run_dir`` (None if there is none); a
    path = that checkpoint dir (which must be intact), or the newest intact checkpoint of that run dir.

    Intact: every file matches the SHA-256 recorded when it was saved (:func:`mtlora.run.checksums.verify`)
    and parses. A damaged checkpoint is skipped with a warning that names the file and the checkpoint used
    instead; when every checkpoint is damaged, :class:`~mtlora.errors.IntegrityError` names them."""
    if resume is None:
        return None
    target = Path(run_dir) if resume == "auto" else Path(resume)
    if (target / TRAINER_STATE).exists():
        verify(target)  # an explicit checkpoint: no other to fall back to
        return target
    ckpts = list_checkpoints(target)
    damaged: list[str] = []
    for ckpt in reversed(ckpts):
        try:
            verify(ckpt)
        except IntegrityError as e:
            damaged.append(str(e))
            log.warning("checkpoint %s is damaged, skipping it: %s", ckpt, e)
            continue
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint", ckpt)
        return ckpt
    if damaged:
        raise IntegrityError(
            f"resume={resume!r}: every checkpoint of {target} is damaged: " + "; ".join(damaged)
        )
    if resume == "auto":
        return None
    raise FileNotFoundError(f"resume={resume!r}: no checkpoint found there (looked for checkpoints/step_*/)")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
