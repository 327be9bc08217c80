"""Smoke test of ``scripts/bench_adapters.py``: one tiny run, a row per registered adapter method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.adapters.registry import ADAPTER_METHODS, registered
from mtlora.adapters.spec import MethodSpec
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_adapters")


def test_tiny_run_has_a_row_per_method(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8"]
    res = bench.main([*argv, "--warmup", "0", "--repeats", "1", "--out", str(out)])
    rows = {r["method"]: r for r in res["adapters"]["rows"]}
    assert set(rows) == {*ADAPTER_METHODS, "none"}
    for name, r in rows.items():  # every registered method has its conf/adapter YAML and must run
        assert r["status"] == "ok", (name, r["status"])
        assert r["median_ms"] > 0 and r["peak_mib"] > 0 and (r["trainable"] > 0) == (name != "none")
    assert rows["lora"]["status"] == "ok" and rows["lora"]["trainable"] == res["adapters"]["budget_params"]
    table = capsys.readouterr().out
    for name in ADAPTER_METHODS:
        assert f"| {name} |" in table
    # --out appends one record per run
    bench.main([*argv, "--warmup", "0", "--repeats", "1", "--methods", "lora", "--out", str(out)])
    assert len(json.loads(out.read_text())) == 2


def test_rank_matching_rules(bench) -> None:
    """``--match rank``: per-head rank = R / heads for shared-A multi-head methods, the total otherwise."""
    args = bench.parse_args(["--shape", "tiny", "--match", "rank", "--budget-rank", "16", "--heads", "4"])
    shape = bench.layer_shape("tiny")
    for method, rank in (("lora", 16), ("hydralora", 4), ("moelora", 16)):
        cfg = bench.adapter_config(method, args)
        bench.match_budget(cfg, args, shape, budget=0)
        assert cfg.rank == rank, method


def test_missing_config_is_skipped(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    args = bench.parse_args(["--shape", "tiny", "--batch", "1", "--seq", "4"])
    spec = MethodSpec(name="no_such_method", layer=ADAPTER_METHODS["lora"], doc="a method without a yaml")
    with registered(spec):
        row, step = bench.prepare(
            "no_such_method", args, bench.layer_shape("tiny"), 1, bench.torch.device("cpu")
        )
    assert step is None and row["status"] == "skipped: no conf/adapter/no_such_method.yaml"


def test_cpu_memory_tracker_counts_new_storages(bench) -> None:
    torch = bench.torch
    a = torch.ones(1024)  # allocated before: not counted
    with bench.LiveTensorBytes() as t:
        b = a * 2  # 4 KiB new
        v = b.view(32, 32)  # view: no new storage
        b.add_(1)  # in place: none
        c = torch.empty(2048)  # 8 KiB new
        del c  # freed
        d = v + 1  # 4 KiB new
    assert t.peak == 4096 * 3 and t.live == 4096 * 2
    del b, v, d


def test_peft_comparison_runs(bench) -> None:
    argv = ["--no-adapters", "--peft", "--peft-model", "tiny", "--peft-layers", "1", "--device", "cpu"]
    res = bench.main([*argv, "--batch", "1", "--seq", "8", "--warmup", "0", "--repeats", "1"])
    rows = {r["impl"]: r for r in res["peft"]["rows"]}
    assert set(rows) == {"mtlora lora", "peft LoRA"} and "adapters" not in res
    assert rows["mtlora lora"]["trainable"] == rows["peft LoRA"]["trainable"] > 0  # same targets and rank
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows.values())
