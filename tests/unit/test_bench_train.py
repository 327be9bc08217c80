"""Smoke test of ``scripts/bench_train.py`` on the tiny model (CPU): a row per method, all run, and every
method starts from the same base weights (the base is built once per run and copied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train")


def test_tiny_run_has_a_row_per_method(bench, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    argv = [
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seq",
        "16",
        "--warmup",
        "0",
        "--steps",
        "1",
    ]
    res = bench.main([*argv, "--out", str(out)])
    assert [r["method"] for r in res["rows"]] == bench.METHODS
    for r in res["rows"]:
        assert "status" not in r, r  # failures are reported in a status field
        assert r["tokens_per_s"] > 0 and r["trainable"] > 0
    assert json.loads(out.read_text())["command"].startswith("python scripts/bench_train.py --model tiny")


def test_every_method_gets_a_fresh_copy_of_one_base(bench) -> None:
    args = bench.parse_args(["--model", "tiny", "--device", "cpu"])
    cpu = torch.device("cpu")
    a, b = bench.base_model(args, cpu), bench.base_model(args, cpu)
    assert a is not b
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.data_ptr() != pb.data_ptr() and torch.equal(pa, pb), name
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # a method's model never changes the next one's base
    assert torch.equal(next(bench.base_model(args, cpu).parameters()), next(b.parameters()))
