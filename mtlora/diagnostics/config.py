"""The ``diagnostics`` config node (``conf/diagnostics/*.yaml``): the names and the value checks.

Kept free of heavy imports so that :func:`mtlora.config.validate_config` can use it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: every diagnostic, in the order they run
DIAGNOSTICS = ("heads", "conflict", "spectral", "routing", "divergence", "tsne")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    v = OmegaConf.select(cfg, key, default=default) if OmegaConf.is_config(cfg) else default
    return default if v is None else v


def check_diagnostics_config(cfg: DictConfig | None) -> list[str]:
    """Errors (``"diagnostics.<key>=...: must be ..."``) of a ``diagnostics`` config node; empty when valid."""
    if cfg is None:
        return []
    errs: list[str] = []

    def names(key: str) -> None:
        v = cfg.get(key)
        if v is None:
            return
        if not isinstance(v, ListConfig | list) or any(n not in DIAGNOSTICS for n in v):
            errs.append(f"diagnostics.{key}={_plain(v)!r}: must be a list drawn from {list(DIAGNOSTICS)}")

    def int_(key: str, optional: bool = False) -> None:
        v = OmegaConf.select(cfg, key)
        if v is None and optional:
            return
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            errs.append(
                f"diagnostics.{key}={v!r}: must be an integer >= 1" + (" (or null)" if optional else "")
            )

    names("which")
    names("periodic")
    plot_at = cfg.get("plot_at")
    if plot_at is not None and (
        not isinstance(plot_at, ListConfig | list) or any(e not in ("init", "step", "end") for e in plot_at)
    ):
        errs.append(
            f"diagnostics.plot_at={_plain(plot_at)!r}: must be a list drawn from ['init', 'step', 'end']"
        )
    int_("every_steps", optional=True)
    for key in (
        "conflict.batches_per_task",
        "conflict.batch_size",
        "routing.max_examples_per_task",
        "routing.max_examples",
        "routing.batch_size",
        "divergence.max_examples_per_task",
        "divergence.batch_size",
    ):
        if OmegaConf.select(cfg, key) is not None:
            int_(key)
    bands = OmegaConf.select(cfg, "spectral.bands")
    if bands is not None:
        ok = isinstance(bands, ListConfig | list) and len(bands) > 0
        ok = ok and all(
            isinstance(b, ListConfig | list) and len(b) == 2 and 0 <= float(b[0]) < float(b[1]) <= 100
            for b in bands
        )
        if not ok:
            errs.append(
                f"diagnostics.spectral.bands={_plain(bands)!r}: must be a list of [p0, p1] with 0 <= p0 < p1 <= 100"
            )
    for key, allowed in (("spectral.edges", ("ceil", "floor")), ("routing.protocol", ("tokens", "notebook"))):
        v = OmegaConf.select(cfg, key)
        if v is not None and v not in allowed:
            errs.append(f"diagnostics.{key}={v!r}: must be one of {list(allowed)}")
    v = OmegaConf.select(cfg, "conflict.exclude_task_specific")
    if v is not None and not isinstance(v, bool):
        errs.append(f"diagnostics.conflict.exclude_task_specific={v!r}: must be true or false")
    perp = OmegaConf.select(cfg, "tsne.perplexity")
    if perp is not None and not (isinstance(perp, int | float) and not isinstance(perp, bool) and perp > 0):
        errs.append(f"diagnostics.tsne.perplexity={perp!r}: must be a number > 0")
    return errs


def check_diagnostics_hardware(cfg: DictConfig) -> list[str]:
    """Errors for diagnostics during training that the ``hardware`` setup cannot run: none under DeepSpeed
    ZeRO-3, which partitions the parameters (shape ``[0]`` outside a forward). The diagnostics run on the main
    process only: they read the adapter weights directly (heads, spectral, t-SNE) and run forwards and
    ``autograd.grad`` outside the DeepSpeed engine (conflict, routing, divergence); with several processes
    the main process would wait forever for the others' shards, with one the weights read are empty."""
    which = _get(cfg, "diagnostics.which", [])
    scheduled = any(_get(cfg, f"diagnostics.{k}", None) for k in ("at_init", "at_end", "every_steps"))
    ds = OmegaConf.select(cfg, "hardware.deepspeed")
    if not which or not scheduled or not ds or OmegaConf.select(cfg, "hardware.deepspeed.stage") != 3:
        return []
    try:
        procs = int(OmegaConf.select(cfg, "hardware.num_processes") or 1) * int(
            OmegaConf.select(cfg, "hardware.num_machines") or 1
        )
    except (TypeError, ValueError):  # reported by the hardware checks
        procs = 0
    where = f"{procs} processes" if procs > 1 else "one process"
    return [
        f"diagnostics={_get(cfg, 'diagnostics.name', '?')} (which={_plain(which)}): not supported under "
        f"DeepSpeed ZeRO-3 (hardware={_get(cfg, 'hardware.name', '?')}, {where}): the diagnostics run on the "
        "main process and need the full parameters, which ZeRO-3 partitions. Set diagnostics=none (or use a "
        "DDP/ZeRO-2 hardware preset) and run `python -m mtlora.diagnose run_dir=R` on the saved run"
    ]


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
