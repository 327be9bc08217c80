#!/usr/bin/env bash
# GPU checks for a machine with a CUDA GPU and no network. Run from the repository root there, after
# scripts/device_wheels.sh has filled .whl/ on a machine with PyPI access and .whl/ came along:
#   OUT=<results dir> bash scripts/device_check.sh
# Writes to $OUT: env.txt, test_gpu.log (pytest -m gpu, tests/gpu), bench_train.jsonl + bench_*.log
# (scripts/bench_train.py: ours vs peft's LoRA and the multi-task adapters, Qwen2.5 shapes, bf16).
# Each step has its own time limit, so a slow one cannot hold up the others. DeepSpeed is not installed
# (its ZeRO paths are tested on the CPU: tests/integration/test_deepspeed_training.py); its GPU tests skip.
# Record the results with their command lines in docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, accelerate, peft, datasets, hydra, pyarrow
print(sys.version); [print(m.__name__, m.__version__) for m in (torch, transformers, accelerate, peft, datasets, hydra, pyarrow)]
print('cuda', torch.cuda.is_available(), torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 210 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider --timeout 200 -o addopts="" 2>&1 \
  | tee "$OUT/test_gpu.log" | tail -25

bench() {  # name, limit (s), args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 scripts/bench_train.py --device cuda --out "$OUT/bench_train.jsonl" "$@" \
    > "$OUT/bench_$name.log" 2>&1
  echo "bench $name: exit $?"; tail -12 "$OUT/bench_$name.log"
}
M=lora,peft_lora,hydralora,mtl_lora,align_kl
bench q05b 100 --model qwen2.5-0.5b --batch 8 --seq 1024 --methods $M --warmup 3 --steps 10
bench q15b 100 --model qwen2.5-1.5b --batch 8 --seq 1024 --methods $M --warmup 3 --steps 10
bench q7b 150 --model qwen2.5-7b --batch 4 --seq 1024 --methods lora,peft_lora --warmup 2 --steps 6
