"""Generation throughput: our ``greedy_generate`` vs lm-eval's Hugging Face backend, same model, same prompts.

Usage::

    python scripts/bench_generate.py --run-dir RUN [--tasks a,b] [--n 4] [--device cpu|cuda] [--dtype float32]
    python scripts/bench_generate.py --model-dir HF_DIR [--tokenizer TOK_DIR] ...
    python scripts/bench_generate.py --random-model qwen2.5-0.5b [--layers 4] ...   # conf/model/<name>.yaml shape

Needs lm-eval (``pip install 'mtlora[crosscheck]'``); offline.

Prompts: the first ``--n`` examples of each of ``--tasks``, built by :func:`mtlora.eval.bbh.build_prompt` under
``--protocol`` (default ``lmeval_fewshot``, whose prompts are byte-identical to lm-eval's ``bbh_fewshot``; see
``scripts/crosscheck_lmeval.py``). Both sides decode greedily with the same ``--max-new-tokens`` (default: the
protocol's) and the protocol's stop strings:

* **ours**: :func:`mtlora.eval.generate.greedy_generate` (length-sorted batches under ``--batch-tokens``, at most
  ``--max-batch-size`` rows, left padding, KV cache, per-row stop strings);
* **lm-eval**: ``lm_eval.models.huggingface.HFLM(pretrained=<the same model object>, tokenizer=<the same
  tokenizer>, batch_size=B, max_length=<large, no truncation>).generate_until(requests)`` with
  ``{"until": stop, "max_gen_toks": N, "do_sample": False, "temperature": 0.0}``: HF ``model.generate`` with
  lm-eval's stop-sequence criteria, per ``--lmeval-batch-size`` (each value is a separate row).

Timing: one untimed warm-up call per implementation (one prompt, 4 tokens), then ``--repeats`` timed calls of
the whole prompt set; the median wall time is reported (``torch.cuda.synchronize`` around each call on CUDA).
``tokens`` = the tokens our loop generated up to each row's stop (EOS excluded), identical for both sides when
the outputs are identical; tokens/s = tokens / wall time. ``identical`` = every output string equal.

``--random-model`` builds the preset's architecture with random weights and our byte tokenizer
(``vocab_size`` = 259, so the LM head is far smaller than the real model's; ``--layers`` cuts the depth).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = ("float32", "bfloat16", "float16")


def load_model(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.random_model:
        from omegaconf import OmegaConf

        from mtlora.models.byte_tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer
        from mtlora.models.factory import build_model

        cfg = OmegaConf.load(REPO / "conf" / "model" / f"{args.random_model}.yaml")
        cfg.init = "random"
        cfg.dtype = args.dtype
        cfg.tokenizer = {"kind": "bytes", "hub_id": None}
        cfg.arch.vocab_size = BYTE_VOCAB_SIZE
        if args.layers:
            cfg.arch.num_hidden_layers = args.layers
        model, tok = build_model(cfg), build_byte_tokenizer()
        desc = f"random-init {args.random_model} shape, {cfg.arch.num_hidden_layers} layers, byte vocab 259"
    else:
        import tempfile

        # a run dir is exported (merged) into a temporary dir, loaded, and the dir removed
        with tempfile.TemporaryDirectory(prefix="bench_gen_") as tmp:
            if args.run_dir:
                sys.path.insert(0, str(Path(__file__).parent))
                from crosscheck_lmeval import hf_model_dir

                model_dir, tok_dir = hf_model_dir(Path(args.run_dir), Path(tmp))
                desc = f"run {args.run_dir} (merged HF export)"
            else:
                model_dir, tok_dir = Path(args.model_dir), Path(args.tokenizer or args.model_dir)
                desc = f"HF dir {model_dir}"
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model = model.to(device=args.device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    return model, tok, f"{desc}, {n_params / 1e6:.2f}M parameters"


def build_prompts(tasks, n, protocol, data_dir):
    from mtlora.eval import bbh

    prompts = []
    for task in tasks:
        _, examples = bbh.load_task(task, data_dir, protocol)
        for ex in examples[:n]:
            prompts.append(bbh.build_prompt(protocol, task, ex["input"], data_dir))
    return prompts


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, times


def run_ours(model, tok, prompts, max_new, stop, args):
    from mtlora.eval.generate import greedy_generate, truncate_at_first_stop

    def call(ps=prompts, n=max_new):
        ids = greedy_generate(
            model,
            tok,
            ps,
            n,
            stop=stop,
            batch_tokens=args.batch_tokens,
            max_batch_size=args.max_batch_size,
            progress=False,
            return_ids=True,
        )
        texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
        texts = [truncate_at_first_stop(t, stop)[0] if stop else t for t in texts]
        return texts, [len(x) for x in ids]

    call(prompts[:1], 4)  # warm-up
    (texts, n_tokens), times = time_calls(call, args.repeats, args.device)
    return texts, n_tokens, times


def run_lmeval(model, tok, prompts, max_new, stop, batch_size, args):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=args.max_length, device=args.device
    )
    gen_kwargs = {"until": list(stop), "max_gen_toks": max_new, "do_sample": False, "temperature": 0.0}

    def reqs(ps, kw):
        return [
            Instance(
                request_type="generate_until",
                doc={},
                arguments=(p, dict(kw)),
                idx=0,
                metadata=("bench", i, 1),
            )
            for i, p in enumerate(ps)
        ]

    lm.generate_until(reqs(prompts[:1], {**gen_kwargs, "max_gen_toks": 4}), disable_tqdm=True)  # warm-up
    out, times = time_calls(
        lambda: lm.generate_until(reqs(prompts, gen_kwargs), disable_tqdm=True), args.repeats, args.device
    )
    return out, times


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir")
    src.add_argument("--model-dir")
    src.add_argument("--random-model", help="a conf/model/<name>.yaml preset, built with random weights")
    ap.add_argument("--tokenizer")
    ap.add_argument("--layers", type=int, default=None, help="--random-model: number of decoder layers")
    ap.add_argument("--tasks", default="boolean_expressions,date_understanding,navigate")
    ap.add_argument("--n", type=int, default=4, help="examples per task")
    ap.add_argument("--protocol", default="lmeval_fewshot")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the protocol's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--lmeval-batch-size", default="1", help="comma-separated, one row each (e.g. 1,8)")
    ap.add_argument("--max-length", type=int, default=1 << 16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="append a JSON record to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    import torch

    from mtlora.eval import bbh

    if args.threads:
        torch.set_num_threads(args.threads)
    p = bbh.get_protocol(args.protocol)
    max_new = args.max_new_tokens or p.decode.max_new_tokens
    stop = tuple(p.decode.stop)
    tasks = [t for t in args.tasks.split(",") if t]
    prompts = build_prompts(tasks, args.n, args.protocol, args.data_dir)
    model, tok, desc = load_model(args)
    prompt_tokens = [len(tok(x)["input_ids"]) for x in prompts]
    print(
        f"model: {desc}; {len(prompts)} prompts ({min(prompt_tokens)}-{max(prompt_tokens)} tokens), "
        f"max_new_tokens {max_new}, stop {stop!r}, {args.device} {args.dtype}",
        flush=True,
    )

    ours, n_tokens, t_ours = run_ours(model, tok, prompts, max_new, stop, args)
    tokens = sum(n_tokens)
    m_ours = statistics.median(t_ours)
    rows = [
        {
            "impl": "mtlora greedy_generate",
            "batch": f"tokens<={args.batch_tokens}, rows<={args.max_batch_size}",
            "seconds": m_ours,
            "tokens_per_s": tokens / m_ours,
            "speedup_vs_lmeval": None,
            "identical": True,
        }
    ]
    for bs in [b.strip() for b in args.lmeval_batch_size.split(",") if b.strip()]:
        bs_val = bs if bs == "auto" else int(bs)
        theirs, t_le = run_lmeval(model, tok, prompts, max_new, stop, bs_val, args)
        m_le = statistics.median(t_le)
        same = [a == b for a, b in zip(ours, theirs)]
        rows.append(
            {
                "impl": "lm-eval HFLM.generate_until",
                "batch": f"batch_size={bs}",
                "seconds": m_le,
                "tokens_per_s": tokens / m_le,
                "speedup_vs_lmeval": m_le / m_ours,
                "identical": all(same),
                "n_identical": sum(same),
            }
        )
    print(
        f"\n{len(prompts)} prompts, {tokens} generated tokens (ours, to the stop), repeats {args.repeats}\n"
    )
    print("| implementation | batching | wall s (median) | tokens/s | ours × faster | outputs identical |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        sp = "" if r["speedup_vs_lmeval"] is None else f"{r['speedup_vs_lmeval']:.2f}"
        ident = "-" if r["impl"].startswith("mtlora") else f"{r['n_identical']}/{len(prompts)}"
        print(
            f"| {r['impl']} | {r['batch']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {sp} | {ident} |"
        )
    record = {
        "model": desc,
        "device": args.device,
        "dtype": args.dtype,
        "protocol": args.protocol,
        "tasks": tasks,
        "n_prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new,
        "stop": stop,
        "generated_tokens": tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.out:
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.exists() else []
        data.append(record)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
