"""Each method's benchmark config: its YAML, the shared targets and heads, and the rank for the budget
(``--match params``) or the equal total rank (``--match rank``, the spec's ``rank_rule``)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from adapter_bench.common import Skip
from adapter_bench.stack import build_stack, load_yaml_with_defaults, trainable
from mtlora.adapters.inject import inject_adapters
from mtlora.adapters.registry import spec_of


def adapter_config(method: str, args: argparse.Namespace) -> DictConfig:
    """The method's ``conf/adapter`` defaults with the benchmark's targets, heads and task count."""
    cfg = load_yaml_with_defaults("adapter", method)
    if cfg.get("method") != method:
        raise Skip(f"conf/adapter/{method}.yaml has method={cfg.get('method')!r}")
    if "rank" not in cfg:
        raise Skip("no adapter.rank to set the budget with")
    cfg.target_modules = list(args.targets)
    if "num_tasks" in cfg:
        cfg.num_tasks = args.num_tasks
    if args.dropout is not None:
        cfg.dropout = args.dropout
    key = multiplicity_key(cfg)
    if key is not None and args.heads is not None:
        cfg[key] = args.heads
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # an interpolation this script does not provide
        raise Skip(f"config does not resolve outside Hydra: {e}") from e
    return cfg


def multiplicity_key(cfg: DictConfig) -> str | None:
    """The knob holding the method's number of heads / LoRAs / experts / splits (the spec's ``heads_key``,
    set to ``--heads``), or None."""
    return spec_of(str(cfg.method)).heads_key


def rank_rule(cfg: DictConfig) -> str:
    """``--match rank``: how ``adapter.rank`` relates to the total rank R (the spec's ``rank_rule``):
    ``per_head``, the rank of each of the n heads (rank = R / n), or ``total`` (rank = R)."""
    return spec_of(str(cfg.method)).rank_rule


def count_on_meta(cfg: DictConfig, shape: dict[str, Any], layers: int) -> int:
    stack = build_stack(shape, layers, "meta", torch.float32)
    inject_adapters(stack, cfg)
    return trainable(stack)


def match_budget(cfg: DictConfig, args: argparse.Namespace, shape: dict[str, Any], budget: int) -> str:
    """Set ``cfg.rank`` for the budget (see module doc); returns the rule applied, for the table."""
    r = args.budget_rank
    key = multiplicity_key(cfg)
    if args.match == "rank":
        if key is not None and rank_rule(cfg) == "per_head":
            n = int(cfg[key])
            if r % n:
                raise Skip(f"--budget-rank {r} is not a multiple of {key}={n}")
            cfg.rank = r // n
            return f"rank {r}/{n} per head"
        cfg.rank = r
        return f"rank {r}"
    best: tuple[int, int] | None = None
    error = ""
    for cand in range(1, 64 * r + 1):  # the count grows with the rank: stop at the first one over budget
        cfg.rank = cand
        try:
            n = count_on_meta(cfg, shape, args.layers)
        except Exception as e:  # a rank the method rejects (e.g. not a multiple of num_experts)
            error = f"{type(e).__name__}: {e}"
            continue
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (cand, n)
        if n >= budget:
            break
    if best is None:
        raise Skip(f"no rank in 1..{64 * r} builds on the stack ({error})")
    cfg.rank = best[0]
    return "closest params"


def describe(cfg: DictConfig | None) -> str:
    if cfg is None:
        return "-"
    key = multiplicity_key(cfg)
    return f"r={cfg.rank}" + (f", {key}={cfg[key]}" if key else "")
