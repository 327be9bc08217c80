"""Training throughput (tokens/s), MFU and peak memory of whole random-init models, per adapter method.

Measures the reference throughput of peft's LoRA (the anchor figures in ``docs/benchmarks.md``) with the
same method, and puts our adapters beside peft's LoRA in the same process on the same batch:

* model: ``conf/model/<--model>.yaml`` built with ``init=random`` (``mtlora.models.build_model``; the real
  Qwen2.5 shapes for ``qwen2.5-0.5b|1.5b|7b``), weights in ``--dtype`` (bf16 on CUDA, as the anchor: bf16
  weights, not autocast), ``attn_implementation`` from the model config (``sdpa``);
* methods (``--methods``): ``lora`` (ours), ``peft_lora`` (``peft.get_peft_model``, ``LoraConfig`` with the
  same rank/alpha/targets, no dropout; peft keeps the adapter in fp32 on a bf16 base, as ours does),
  ``hydralora``, ``mtl_lora``, ``align_kl`` (LoRA + the KL alignment loss of ``conf/alignment/kl.yaml``), or
  any other ``conf/adapter`` method. Every method gets ``--rank`` (default 8), ``--targets`` (default all
  seven linear projections), dropout ``--dropout`` (default 0) and ``--num-tasks`` tasks; the rest of its
  ``conf/adapter`` defaults stay (alpha, heads, ...). Task-aware methods get random row task ids;
* step: ``AdamW.zero_grad``, forward with ``labels=input_ids`` (HF's loss, as the anchor), the adapters'
  auxiliary losses (and the alignment loss), backward, ``AdamW.step``; random token ids (one batch, the
  same for every method); ``--warmup`` untimed steps then ``--steps`` timed ones (``torch.cuda.synchronize``
  around each); tokens/s = batch·seq / median step time;
* peak memory: ``torch.cuda.max_memory_allocated`` from the model's build to the end of its steps (weights,
  optimizer state, activations); on CPU not measured (reported as null);
* MFU (model FLOPs utilisation) against ``--peak-tflops`` (989: H100 SXM dense bf16):

  - ``mfu`` (the anchor's definition): 4·N FLOPs per token, N = the base model's parameters (tied embedding
    counted once): forward 2N + activation gradients 2N (the base is frozen: no weight gradients); attention
    score/value FLOPs and the adapters' own FLOPs are ignored;
  - ``mfu_6n``: 6·N + 12·L·d_attn·seq per token (the PaLM-paper convention, as if the weights were trained,
    with the attention matmuls counted non-causally, forward + backward), for comparison with papers.

Usage (the H100 commands are recorded in docs/benchmarks.md)::

    python scripts/bench_train.py --model tiny --device cpu --batch 2 --seq 64 --warmup 1 --steps 3
    python scripts/bench_train.py --model qwen2.5-0.5b --batch 8 --seq 1024 --out bench_train.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))

from mtlora.adapters import inject_adapters  # noqa: E402
from mtlora.models.factory import arch_config, build_model, torch_dtype  # noqa: E402
from mtlora.training.alignment_window import AlignmentTerm  # noqa: E402
from mtlora.training.compile import compile_decoder_layers  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "peft_lora", "hydralora", "mtl_lora", "align_kl"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def load_yaml(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with same-group string ``defaults:`` merged first."""
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    merged = OmegaConf.create()
    for entry in cfg.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            merged = OmegaConf.merge(merged, load_yaml(group, entry))
    return OmegaConf.merge(merged, cfg)


def model_config(args: argparse.Namespace) -> DictConfig:
    mcfg = load_yaml("model", args.model)
    mcfg.init = "random"
    mcfg.dtype = DTYPES[args.dtype]
    if args.layers is not None:
        mcfg.arch.num_hidden_layers = args.layers
    return mcfg


def adapter_config(method: str, args: argparse.Namespace) -> DictConfig:
    cfg = load_yaml("adapter", "lora" if method == "peft_lora" else method)
    cfg.rank = args.rank
    cfg.target_modules = list(args.targets)
    cfg.dropout = args.dropout
    if "num_tasks" in cfg:
        cfg.num_tasks = args.num_tasks
    OmegaConf.resolve(cfg)
    return cfg


def flops_per_token(model, seq: int) -> dict[str, float]:
    c = model.config
    n = sum(p.numel() for p in _base_params(model))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d_attn = c.num_attention_heads * head_dim
    return {"n_params": n, "anchor": 4.0 * n, "palm": 6.0 * n + 12.0 * c.num_hidden_layers * d_attn * seq}


def _base_params(model) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if not p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_BASE: dict[tuple, torch.nn.Module] = {}


def base_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """A copy of the random-init base model, built once per script run and kept on the CPU. On CUDA it is
    initialised on the GPU in the model's dtype (a 7B shape in seconds, where the CPU's fp32 init takes
    minutes per method), then moved to the CPU; its weights then differ from ``build_model``'s, which a
    throughput measurement does not see."""
    mcfg = model_config(args)
    key = (args.model, args.layers, args.dtype, args.seed, device.type)
    if key not in _BASE:
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(
                    arch_config(mcfg),
                    attn_implementation=mcfg.attn_implementation,
                    dtype=torch_dtype(mcfg.dtype),
                )
            _BASE[key] = model.to("cpu")
            torch.cuda.empty_cache()
        else:
            _BASE[key] = build_model(mcfg)
    return copy.deepcopy(_BASE[key])


def build(method: str, args: argparse.Namespace, device: torch.device):
    """(model, adapter context or None, alignment term or None, config description)."""
    acfg = adapter_config(method, args)
    model = base_model(args, device)
    torch.manual_seed(args.seed)  # the adapter's init
    ctx, align = None, None
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        pc = LoraConfig(
            r=int(acfg.rank),
            lora_alpha=float(acfg.alpha),
            lora_dropout=float(acfg.dropout),
            target_modules=list(acfg.target_modules),
            bias="none",
        )
        model = get_peft_model(model, pc)
    else:
        ctx = inject_adapters(model, acfg)
        if method.startswith("align_"):
            # one micro-batch per step (its rows are the window), rows of the benchmark's one length
            align_cfg = OmegaConf.merge(
                load_yaml("alignment", method.removeprefix("align_")), {"window": "micro", "pad_to": None}
            )
            align = AlignmentTerm.from_config(align_cfg)
    model.to(device).train()
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "peft_lora":
            model.enable_input_require_grads()
    if args.compile:  # the same regional compilation for every method, peft's LoRA included
        compile_decoder_layers(model, {"enabled": True, "backend": args.compile})
    desc = {k: v for k, v in OmegaConf.to_container(acfg).items() if k not in ("target_modules", "name")}
    return model, ctx, align, desc


def bench_method(
    method: str, args: argparse.Namespace, device: torch.device, ids, task_ids
) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, ctx, align, desc = build(method, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    mask = torch.ones_like(ids)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if ctx is not None:
            ctx.begin(task_ids=task_ids, capture=align is not None)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        if ctx is not None:
            aux = ctx.total_aux_loss()
            if aux is not None:
                loss = loss + aux
        if align is not None:
            a = align(ctx.captured, task_ids, mask)
            if a is not None:
                loss = loss + align.weight * a
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        loss0 = step()
    times = []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    tokens = ids.numel()
    med = statistics.median(times)
    fl = flops_per_token(model.base_model.model if method == "peft_lora" else model, ids.shape[1])
    peak = args.peak_tflops * 1e12
    row.update(
        config=desc,
        trainable=sum(p.numel() for p in params),
        n_params=fl["n_params"],
        median_ms=round(1e3 * med, 2),
        min_ms=round(1e3 * min(times), 2),
        tokens_per_s=round(tokens / med, 1),
        mfu=round(fl["anchor"] * tokens / med / peak, 4),
        mfu_6n=round(fl["palm"] * tokens / med / peak, 4),
        peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        loss_first=round(loss0, 4) if args.warmup else None,
        loss_last=round(loss, 4),
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r["method"] == "peft_lora" and "tokens_per_s" in r), None)
    lines = [
        "| method | trainable | tokens/s | × peft | MFU (4N) | MFU (6N+attn) | peak GiB | step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['method']} | {r.get('status')} | | | | | | |")
            continue
        x = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | {x} | {100 * r['mfu']:.1f}% "
            f"| {100 * r['mfu_6n']:.1f}% | {peak} | {r['median_ms']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="conf/model/<name>.yaml (built with init=random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights (default: bf16 on cuda)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; peft_lora = peft's LoRA")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=ALL_LINEAR)
    p.add_argument("--num-tasks", type=int, default=4)
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--grad-ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        help="torch.compile every decoder layer (train.compile) with this backend (default inductor)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append the result (JSON lines)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    vocab_cfg = model_config(args)
    from mtlora.models import build_tokenizer

    vocab = vocab_cfg.arch.vocab_size or len(build_tokenizer(vocab_cfg))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(int(vocab), (args.batch, args.seq), generator=g).to(device)
    task_ids = torch.randint(args.num_tasks, (args.batch,), generator=g).to(device)
    rows = []
    run: Callable[[str], dict[str, Any]] = lambda m: bench_method(m, args, device, ids, task_ids)  # noqa: E731
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        try:
            rows.append(run(method))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"method": method, "status": f"OOM: {str(e).splitlines()[0][:120]}"})
        except Exception as e:  # report, do not stop the other methods
            rows.append(
                {"method": method, "status": f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]}
            )
    res = {
        "command": "python scripts/bench_train.py " + shlex.join(argv),
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "torch": torch.__version__,
        "rows": rows,
    }
    print(res["command"])
    print(table(rows))
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
