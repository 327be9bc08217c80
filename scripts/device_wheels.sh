#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels that the lent GPU machine lacks (its image has torch,
# transformers, accelerate, peft, pytest, pandas... but not Hydra, OmegaConf or datasets, and nothing can be
# fetched there) into .whl/ (git-ignored through .git/info/exclude), for scripts/device_check.sh.
# Python 3.12, x86-64 (that machine's python3). pyarrow (55 MB) comes along because datasets 5.x needs
# pyarrow >= 24; the whole tree that travels must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
py312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${py312[@]}" -d .whl \
  hydra-core==1.3.2 omegaconf==2.3.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" pyarrow==26.0.1
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only on PyPI (pure Python)
ls -la .whl && du -sh .whl
