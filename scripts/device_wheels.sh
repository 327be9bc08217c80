#!/usr/bin/env bash
# On a machine with PyPI access: download into .whl/ (git-ignored) the wheels that a GPU machine without
# network may lack, for scripts/device_check.sh there. A typical CUDA image has torch, transformers,
# accelerate, peft, pytest and pandas but not Hydra, OmegaConf or datasets. The wheels are for Python 3.12
# on x86-64 Linux (change the --python-version and --platform options below for another target). pyarrow
# (55 MB) comes along because datasets 5.x needs pyarrow >= 24.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${py312[@]}" -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" pyarrow==26.0.1
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only on PyPI (pure Python)
ls -la .whl && du -sh .whl
