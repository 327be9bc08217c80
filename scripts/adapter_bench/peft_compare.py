"""``--peft``: mtlora's LoRA against peft's on a random-init whole model, the same batch and optimizer."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from adapter_bench.common import MIB
from adapter_bench.measure import peak_step_bytes, time_steps
from adapter_bench.stack import load_yaml_with_defaults
from mtlora.adapters.inject import inject_adapters


def bench_peft(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from mtlora.models.factory import build_model

    mcfg = load_yaml_with_defaults("model", args.peft_model)
    mcfg.init = "random"
    mcfg.dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    if args.peft_layers is not None:
        mcfg.arch.num_hidden_layers = args.peft_layers
    lcfg = load_yaml_with_defaults("adapter", "lora")
    lcfg.rank = args.budget_rank
    lcfg.target_modules = list(args.targets)
    if args.dropout is not None:
        lcfg.dropout = args.dropout

    def ours() -> nn.Module:
        m = build_model(mcfg)
        inject_adapters(m, lcfg)
        return m

    def theirs() -> nn.Module:
        pc = LoraConfig(
            r=int(lcfg.rank),
            lora_alpha=float(lcfg.alpha),
            lora_dropout=float(lcfg.dropout),
            target_modules=list(args.targets),
            bias="none",
            use_rslora=bool(lcfg.use_rslora),
        )
        return get_peft_model(build_model(mcfg), pc)

    batch, seq = args.peft_batch or args.batch, args.peft_seq or args.seq
    runs: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], None]] = {}
    for name, make in (("mtlora lora", ours), ("peft LoRA", theirs)):
        torch.manual_seed(args.seed)
        model = make().to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        vocab = model.config.vocab_size if hasattr(model, "config") else model.base_model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(vocab, (batch, seq), generator=g).to(device)

        def step(model=model, opt=opt, ids=ids) -> None:
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            opt.step()

        steps[name] = step
        runs[name] = {"impl": name, "trainable": sum(p.numel() for p in params), "times": []}
    for step in steps.values():  # warm-up (also creates AdamW's state)
        for _ in range(max(args.warmup, 1)):
            step()
    rounds = max(1, min(args.rounds, args.repeats))
    for k in range(rounds):  # alternate the two models so that drift hits both
        n = args.repeats // rounds + (1 if k < args.repeats % rounds else 0)
        for name, step in steps.items():
            runs[name]["times"] += time_steps(step, device, 0, n)
    for name, step in steps.items():
        r = runs[name]
        r["median_ms"] = 1e3 * statistics.median(r["times"])
        r["min_ms"] = 1e3 * min(r["times"])
        r["tokens_per_s"] = batch * seq / (r["median_ms"] / 1e3)
        r["peak_mib"] = peak_step_bytes(step, device) / MIB
        r["times"] = [round(1e3 * t, 3) for t in r["times"]]
    ref = runs["peft LoRA"]
    for r in runs.values():
        r["time_x_peft"] = r["median_ms"] / ref["median_ms"]
        r["mem_x_peft"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
    arch = OmegaConf.to_container(mcfg.arch)
    return {"model": args.peft_model, "arch": arch, "batch": batch, "seq": seq, "rows": list(runs.values())}
