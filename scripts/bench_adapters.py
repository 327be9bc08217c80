"""Forward+backward step time and peak memory per adapter method at an equal trainable-parameter budget.

Two benchmarks (results: a markdown table on stdout, and a record appended to ``--out`` JSON):

1. **Adapter layers** (always). For a layer-shape preset (``--shape``: any ``conf/model/<name>.yaml`` with an
   ``arch``; e.g. ``tiny``, ``qwen2.5-0.5b``, ``qwen2.5-7b``) a stack of ``--layers`` decoder layers made of the
   seven linear projections only (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, biases on q/k/v
   for Qwen2) is built; the data flow is ``h = x + o(q + repeat_kv(k·v))``, ``y = h + down(silu(gate(h))·up(h))``
   (no attention softmax, no norms: the benchmark isolates the cost of the adapted linears). Every method of
   ``mtlora.adapters.registry`` (new registrations included automatically) is injected on the
   same targets (``--targets``, default all seven), with its defaults read from ``conf/adapter/<method>.yaml``
   (OmegaConf; ``defaults:`` adapter parents merged first, ``num_tasks`` set to ``--num-tasks``). Task-aware
   methods (``needs_task_ids``) get random task ids through the adapter context. The input requires grad (as
   for a layer in the middle of a network), the loss is ``mean(y²)`` plus the adapters' auxiliary losses.
   A ``none`` row (no adapter) is the frozen-base reference.

   **Budget matching** (``--match``):

   * ``params`` (default; "equal trainable-parameter budget"): the method's multiplicity key (``num_heads``,
     ``num_loras``, ``num_experts`` or ``num_splits``) is set to ``--heads`` and ``adapter.rank`` is chosen
     (1, 2, … up to the first count over the budget; ranks the method rejects are skipped) so that the
     trainable count on the stack is closest to that of plain LoRA of rank R = ``--budget-rank`` on the
     same targets (the table shows the count and its ratio to the budget);
   * ``rank`` ("same total rank", the spec's ``rank_rule``): ``per_head`` methods — shared-A multi-head
     (HydraLoRA, R-LoRA, M-LoRA, mtLoRA), parallel LoRAs (MultiLoRA) and full-rank experts (MoLoRA) — get
     rank R / heads per head, so the heads' ranks sum to R; ``total`` methods — MOELoRA and LoRA-Split,
     whose ``rank`` is already the total split over experts/splits — and all others (LoRA, DoRA, MTL-LoRA
     with its ``num_up`` mixed up-projections) get rank R.

   Block-level placements (mtLoRA's default ``placement: block_ffn``) ignore ``target_modules`` and wrap the
   ``mlp`` sub-block instead; model-level step regularisers (``context.regularizers``, e.g. mtLoRA's spectral
   penalty every 500 steps) are not called. Every method gets random row task ids (``--num-tasks``) through
   ``context.begin(task_ids=...)``: task-aware methods need them, the others ignore them.

   Step time: ``--warmup`` steps, then ``--repeats`` timed steps (``time.perf_counter``, with
   ``torch.cuda.synchronize`` before and after on GPU); the median is reported. A step = zero grads, forward,
   loss, backward (no optimizer: the optimizer cost is in the peft benchmark).

   Peak memory of one step, over what was allocated before it (weights, input): on CUDA
   ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the
   step. On CPU a ``TorchDispatchMode`` counts the bytes of every new tensor storage an op creates (views and
   in-place results share an input's storage and are not counted) and subtracts them when the storage is freed;
   the peak of that running sum is reported. It sees all tensors made by torch ops in forward and backward
   (activations, saved tensors, gradients, temporaries), but not allocator caching/fragmentation, not memory
   kernels allocate internally without a tensor (e.g. oneDNN scratch), and not Python objects. ``tracemalloc``
   would not see torch's allocations at all and the process RSS is monotone and dominated by the allocator,
   which is why neither is used. The measured step is separate from the timed ones (the tracker is slow).

2. **Ours vs peft** (``--peft``): a random-init whole model from ``conf/model/<--peft-model>.yaml``
   (``mtlora.models.factory.build_model`` with ``init=random``; ``--peft-layers`` overrides the number of
   decoder layers), once with ``mtlora``'s ``lora`` injected and once wrapped by ``peft.get_peft_model`` with the
   same rank, alpha, dropout and targets. Same token batch (labels = inputs), each step = forward + backward +
   ``torch.optim.AdamW`` step; the two models alternate in rounds. Tokens/s = batch·seq / median step time.
   Both keep adapter weights in fp32 on a bf16 base (ours by convention, peft by ``autocast_adapter_dtype``).

Usage::

    python scripts/bench_adapters.py --shape tiny --device cpu --dtype fp32 --peft
    python scripts/bench_adapters.py --shape qwen2.5-7b --device cuda --dtype bf16 --batch 4 --seq 1024 \\
        --peft --peft-model qwen2.5-0.5b --out bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # the benchmark's parts (scripts/adapter_bench/)
    sys.path.insert(0, str(SCRIPTS))

from adapter_bench.budget import (  # noqa: E402
    adapter_config,
    count_on_meta,
    describe,
    match_budget,
    multiplicity_key,
    rank_rule,
)
from adapter_bench.common import ALL_TARGETS, CONF, DTYPES, MIB, REPO, Skip  # noqa: E402
from adapter_bench.measure import LiveTensorBytes, peak_step_bytes, sync, time_steps  # noqa: E402
from adapter_bench.peft_compare import bench_peft  # noqa: E402
from adapter_bench.report import adapters_table, machine, peft_table  # noqa: E402
from adapter_bench.stack import build_stack, layer_shape, load_yaml_with_defaults, shape_presets  # noqa: E402

from mtlora.adapters.inject import inject_adapters  # noqa: E402
from mtlora.adapters.registry import get_spec, method_names  # noqa: E402

__all__ = [
    "ALL_TARGETS",
    "CONF",
    "DTYPES",
    "LiveTensorBytes",
    "MIB",
    "REPO",
    "Skip",
    "adapter_config",
    "adapters_table",
    "bench_adapters",
    "bench_peft",
    "build_stack",
    "count_on_meta",
    "describe",
    "layer_shape",
    "load_yaml_with_defaults",
    "machine",
    "main",
    "match_budget",
    "multiplicity_key",
    "parse_args",
    "peak_step_bytes",
    "peft_table",
    "prepare",
    "rank_rule",
    "shape_presets",
    "sync",
    "time_steps",
    "torch",
]


def prepare(
    method: str | None, args: argparse.Namespace, shape: dict[str, Any], budget: int, device: torch.device
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """The table row of ``method`` (``None``: no adapter) and its step function (``None`` when skipped)."""
    row: dict[str, Any] = {"method": method or "none", "status": "ok", "config": "-", "rule": "-"}
    try:
        cfg = None
        if method is not None:
            cfg = adapter_config(method, args)
            row["rule"] = match_budget(cfg, args, shape, budget)
            row["config"] = describe(cfg)
        torch.manual_seed(args.seed)
        model = build_stack(shape, args.layers, device, DTYPES[args.dtype])
        context = inject_adapters(model, cfg) if cfg is not None else None
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in params)
        # every method gets row task ids (task-aware ones need them, the others ignore them)
        task_ids = torch.randint(args.num_tasks, (args.batch,), device=device)
        x = torch.randn(args.batch, args.seq, shape["hidden"], device=device, dtype=DTYPES[args.dtype])
        x.requires_grad_(True)

        def step() -> None:
            for p in (*params, x):
                p.grad = None
            if context is not None:
                context.begin(task_ids=task_ids)
            loss = model(x).float().pow(2).mean()
            aux = context.total_aux_loss() if context is not None else None
            if aux is not None:
                loss = loss + aux
            loss.backward()

        step()  # fails here rather than in the timing loop
        return row, step
    except Skip as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # report, do not crash the other methods
        row["status"] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
    return row, None


def bench_adapters(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """All methods built side by side, warmed up, then timed in ``--rounds`` interleaved rounds."""
    shape = layer_shape(args.shape)
    lora_cfg = adapter_config("lora", args)
    lora_cfg.rank = args.budget_rank
    budget = count_on_meta(lora_cfg, shape, args.layers)
    methods = list(method_names()) if not args.methods else list(args.methods)
    rows: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], None]] = {}
    for m in [None, *methods]:
        if m is not None and get_spec(m) is None:
            rows.append(
                {"method": m, "status": "skipped: not a registered method", "config": "-", "rule": "-"}
            )
            continue
        row, step = prepare(m, args, shape, budget, device)
        rows.append(row)
        if step is not None:
            steps[len(rows) - 1] = step
        print(f"  {row['method']}: {row['status']}", file=sys.stderr, flush=True)
    for step in steps.values():
        time_steps(step, device, args.warmup, 0)
    rounds = max(1, min(args.rounds, args.repeats))
    times: dict[int, list[float]] = {i: [] for i in steps}
    for k in range(rounds):  # interleaved so that load changes on a shared machine hit every method alike
        n = args.repeats // rounds + (1 if k < args.repeats % rounds else 0)
        for i, step in steps.items():
            times[i] += time_steps(step, device, 0, n)
    for i, step in steps.items():
        r = rows[i]
        r["times_ms"] = [round(1e3 * t, 3) for t in times[i]]
        r["median_ms"] = 1e3 * statistics.median(times[i])
        r["min_ms"] = 1e3 * min(times[i])
        r["peak_mib"] = peak_step_bytes(step, device) / MIB
    ref = next((r for r in rows if r["method"] == "lora" and r["status"] == "ok"), None)
    for r in rows:
        if ref is not None and r["status"] == "ok":
            r["params_x_lora"] = r["trainable"] / ref["trainable"] if ref["trainable"] else None
            r["time_x_lora"] = r["median_ms"] / ref["median_ms"]
            r["mem_x_lora"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
    return {"shape": shape, "budget_rank": args.budget_rank, "budget_params": budget, "rows": rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--shape", default="tiny", choices=shape_presets(), help="layer shape: conf/model/<name>.yaml"
    )
    p.add_argument("--layers", type=int, default=1, help="decoder layers in the stack (default 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--budget-rank", type=int, default=16, help="rank R of the plain-LoRA budget (default 16)")
    p.add_argument("--heads", type=int, default=4, help="num_heads/num_loras/num_experts of every method (4)")
    p.add_argument("--match", choices=("params", "rank"), default="params", help="budget rule (see above)")
    p.add_argument("--targets", type=lambda s: tuple(s.split(",")), default=ALL_TARGETS, help="comma list")
    p.add_argument(
        "--methods", type=lambda s: tuple(s.split(",")), default=None, help="default: all registered"
    )
    p.add_argument(
        "--dropout", type=float, default=None, help="override every method's dropout (default: yaml)"
    )
    p.add_argument("--num-tasks", type=int, default=4, help="tasks for task-aware adapters (random ids)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per method (median reported)")
    p.add_argument(
        "--rounds", type=int, default=2, help="the repeats are split into this many interleaved rounds"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--peft", action="store_true", help="also compare our lora with peft's LoRA on a whole model"
    )
    p.add_argument(
        "--peft-model", default="tiny", choices=shape_presets(), help="conf/model preset (random init)"
    )
    p.add_argument("--peft-layers", type=int, default=None, help="override the model's num_hidden_layers")
    p.add_argument("--peft-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--peft-seq", type=int, default=None, help="default: --seq")
    p.add_argument("--no-adapters", action="store_true", help="skip the adapter-layer benchmark")
    p.add_argument("--out", type=Path, default=None, help="JSON file; the run is appended to its list")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    cmd = "python scripts/bench_adapters.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": cmd.strip(),
        "args": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "machine": machine(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = [f"`{result['command']}`", ""]
    if not args.no_adapters:
        res = bench_adapters(args, device)
        result["adapters"] = res
        s = res["shape"]
        out += [
            f"Adapters on {args.layers} x {s['shape']} layer ({s['hidden']}/{s['intermediate']}, "
            f"kv {s['kv_heads']}x{s['head_dim']}), batch {args.batch} x seq {args.seq}, {args.dtype} on "
            f"{device}; budget: LoRA r={args.budget_rank} = {res['budget_params']:,} params, match={args.match}",
            "",
            adapters_table(res),
            "",
        ]
    if args.peft:
        pres = bench_peft(args, device)
        result["peft"] = pres
        out += [
            f"mtlora lora vs peft LoRA: {pres['model']} (random init, {pres['arch']['num_hidden_layers']} layers), "
            f"batch {pres['batch']} x seq {pres['seq']}, {args.dtype} on {device}, fwd+bwd+AdamW",
            "",
            peft_table(pres),
            "",
        ]
    print("\n".join(out), flush=True)
    if args.out is not None:
        prev = json.loads(args.out.read_text()) if args.out.is_file() else []
        prev = prev if isinstance(prev, list) else [prev]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([*prev, result], indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
