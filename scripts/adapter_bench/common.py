"""Paths, units and the skip signal shared by the adapter benchmark's modules."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
if str(REPO) not in sys.path:  # `python scripts/bench_adapters.py` without an installed package
    sys.path.insert(0, str(REPO))

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


class Skip(Exception):
    """A method that cannot be benchmarked here (reported with the reason, not raised)."""
