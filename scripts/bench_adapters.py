"""Forward+backward step time and peak memory per adapter method at an equal trainable-parameter budget.

Two benchmarks (results: a markdown table on stdout, and a record appended to ``--out`` JSON):

1. **Adapter layers** (always). For a layer-shape preset (``--shape``: any ``conf/model/<name>.yaml`` with an
   ``arch``; e.g. ``tiny``, ``qwen2.5-0.5b``, ``qwen2.5-7b``) a stack of ``--layers`` decoder layers made of the
   seven linear projections only (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, biases on q/k/v
   for Qwen2) is built; the data flow is ``h = x + o(q + repeat_kv(k·v))``, ``y = h + down(silu(gate(h))·up(h))``
   (no attention softmax, no norms: the benchmark isolates the cost of the adapted linears). Every method of
   ``mtlora.adapters.registry.ADAPTER_METHODS`` (new registrations included automatically) is injected on the
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
   * ``rank`` ("same total rank", :data:`RANK_RULES`): ``per_head`` methods — shared-A multi-head
     (HydraLoRA, R-LoRA, M-LoRA, mtLoRA), parallel LoRAs (MultiLoRA) and full-rank experts (MoLoRA) — get
     rank R / heads per head, so the heads' ranks sum to R; ``total`` methods — MOELoRA and LoRA-Split,
     whose ``rank`` is already the total split over experts/splits — and all others (LoRA, DoRA, MTL-LoRA
     with its ``num_up`` mixed up-projections) get rank R. Unlisted new methods: ``per_head`` if their
     config has ``num_heads``/``num_loras``, else ``total``.

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
import math
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
if str(REPO) not in sys.path:  # `python scripts/bench_adapters.py` without an installed package
    sys.path.insert(0, str(REPO))

from mtlora.adapters.inject import inject_adapters  # noqa: E402
from mtlora.adapters.registry import ADAPTER_METHODS  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the key holding a method's number of heads / LoRAs / experts / splits (set to ``--heads``)
MULTIPLICITY_KEYS = ("num_heads", "num_loras", "num_experts", "num_splits")
#: ``--match rank``: how ``adapter.rank`` relates to the total rank R, per method. ``per_head``: ``rank`` is
#: the rank of each of the n heads / LoRAs / experts (rank = R / n); ``total``: ``rank`` is already the total
#: (split over the experts / splits; rank = R). Methods not listed: ``per_head`` when their config has
#: ``num_heads`` or ``num_loras``, else ``total``.
RANK_RULES = {
    "hydralora": "per_head",
    "rlora": "per_head",
    "mlora": "per_head",
    "mtlora": "per_head",
    "multilora": "per_head",
    "molora": "per_head",
    "moelora": "total",
    "lora_split": "total",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


class Skip(Exception):
    """A method that cannot be benchmarked here (reported with the reason, not raised)."""


# --------------------------------------------------------------------------------------------- shapes


def load_yaml_with_defaults(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with same-group ``defaults:`` entries merged first (other groups ignored)."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        raise Skip(f"no conf/{group}/{name}.yaml")
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", None) or []
    merged = OmegaConf.create()
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            merged = OmegaConf.merge(merged, load_yaml_with_defaults(group, entry))
    return OmegaConf.merge(merged, cfg)


def shape_presets() -> list[str]:
    return sorted(
        p.stem for p in (CONF / "model").glob("*.yaml") if "arch" in load_yaml_with_defaults("model", p.stem)
    )


def layer_shape(name: str) -> dict[str, Any]:
    arch = load_yaml_with_defaults("model", name).arch
    hidden, heads = int(arch.hidden_size), int(arch.num_attention_heads)
    head_dim = hidden // heads
    return {
        "shape": name,
        "model_type": str(arch.model_type),
        "hidden": hidden,
        "intermediate": int(arch.intermediate_size),
        "heads": heads,
        "kv_heads": int(arch.num_key_value_heads),
        "head_dim": head_dim,
    }


class _Attn(nn.Module):
    def __init__(self, s: dict[str, Any], bias: bool) -> None:
        super().__init__()
        d, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.groups, self.head_dim = s["heads"] // s["kv_heads"], s["head_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.k_proj(x) * self.v_proj(x)
        kv = kv.unflatten(-1, (-1, self.head_dim)).repeat_interleave(self.groups, dim=-2).flatten(-2)
        return self.o_proj(self.q_proj(x) + kv)


class _Mlp(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        d, f = s["hidden"], s["intermediate"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        self.self_attn = _Attn(s, bias=s["model_type"] == "qwen2")
        self.mlp = _Mlp(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(x)
        return h + self.mlp(h)


class LinearStack(nn.Module):
    """``layers`` decoder layers reduced to their seven projections (module names as in HF Qwen2/LLaMA)."""

    def __init__(self, shape: dict[str, Any], layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(shape) for _ in range(layers))
        # what block-level adapters (mtLoRA) read from a HF model
        self.config = SimpleNamespace(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_stack(
    shape: dict[str, Any], layers: int, device: str | torch.device, dtype: torch.dtype
) -> LinearStack:
    with torch.device(device):
        stack = LinearStack(shape, layers)
    stack = stack.to(dtype)
    stack.requires_grad_(False)
    return stack


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- configs


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
    return next((k for k in MULTIPLICITY_KEYS if k in cfg), None)


def rank_rule(cfg: DictConfig) -> str:
    default = "per_head" if any(k in cfg for k in ("num_heads", "num_loras")) else "total"
    return RANK_RULES.get(str(cfg.method), default)


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


# --------------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LiveTensorBytes(TorchDispatchMode):
    """Running sum of the bytes of tensor storages created by ops while active, and its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._tracked:
                continue
            nbytes = st.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, nbytes)
        return out


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory of one ``step`` above what was allocated before it (see module doc)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------- adapters


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
    methods = list(ADAPTER_METHODS) if not args.methods else list(args.methods)
    rows: list[dict[str, Any]] = []
    steps: dict[int, Callable[[], None]] = {}
    for m in [None, *methods]:
        if m is not None and m not in ADAPTER_METHODS:
            rows.append(
                {"method": m, "status": "skipped: not in ADAPTER_METHODS", "config": "-", "rule": "-"}
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


# --------------------------------------------------------------------------------------------- peft


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


# --------------------------------------------------------------------------------------------- output


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def adapters_table(res: dict[str, Any]) -> str:
    lines = [
        "| method | config | trainable | × LoRA params | fwd+bwd median ms | min ms | × LoRA time (median) "
        "| peak step MiB | × LoRA mem | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['config']} | {_f(r.get('trainable'), ',')} | {_f(r.get('params_x_lora'), '.3f')} "
            f"| {_f(r.get('median_ms'), '.2f')} | {_f(r.get('min_ms'), '.2f')} | {_f(r.get('time_x_lora'), '.2f')} "
            f"| {_f(r.get('peak_mib'), '.1f')} "
            f"| {_f(r.get('mem_x_lora'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def peft_table(res: dict[str, Any]) -> str:
    lines = [
        "| implementation | trainable | step median ms | min ms | tokens/s (median) | peak step MiB | × peft time "
        "| × peft mem |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['impl']} | {r['trainable']:,} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_mib']:.1f} | {r['time_x_peft']:.3f} | {_f(r['mem_x_peft'], '.3f')} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
