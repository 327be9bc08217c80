"""``python -m mtlora.count``: meta-device parameter accounting, as a function and as a CLI."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mtlora.count import _with_defaults, count, format_table
from mtlora.errors import ConfigError
from tests.helpers.compose import REPO, compose_train, run_module

MLP = "adapter.target_modules=[up_proj,gate_proj,down_proj]"


def run_count(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # MTLORA_OUTPUT_DIR is where a run dir would go (paths.log_dir): the test checks nothing lands there
    env = {"MTLORA_OUTPUT_DIR": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return run_module("mtlora.count", args, env=env, timeout=120)


def table_value(stdout: str, row: str) -> str:
    m = re.search(rf"^\|\s*{re.escape(row)}\s*\|\s*(.+?)\s*\|$", stdout, flags=re.M)
    assert m, f"row {row!r} not in:\n{stdout}"
    return m.group(1)


def test_cli_qwen25_7b_mlp_lora(tmp_path: Path) -> None:
    proc = run_count(["model=qwen2.5-7b", "adapter=lora", MLP], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    pct = float(table_value(out, "trainable %").rstrip("%"))
    assert pct == pytest.approx(0.20, abs=0.005)
    total = int(table_value(out, "total parameters").replace(",", ""))
    trainable = int(table_value(out, "trainable parameters").replace(",", ""))
    assert total == pytest.approx(7.62e9, rel=0.02)
    assert trainable == 28 * 3 * 8 * (3584 + 18944)  # layers x modules x r (d_in + d_out)
    assert pct == pytest.approx(100 * trainable / total, abs=1e-4)
    assert table_value(out, "adapted modules").startswith("84 ")
    assert table_value(out, "model") == "qwen2.5-7b"
    # nothing written: no run dir under paths.log_dir, no .hydra/ or log file in the repo
    assert not (tmp_path / "outputs").exists()
    assert not (REPO / ".hydra").exists() and not (REPO / "count.log").exists()


def test_count_function_matches_layer_arithmetic() -> None:
    cfg = compose_train(["model=llama2-7b", "adapter.rank=16", "adapter.target_modules=[q_proj,v_proj]"])
    res = count(cfg)
    assert res["adapted_modules"] == 2 * 32
    assert res["adapted_kinds"] == ["q_proj", "v_proj"]
    assert res["trainable"] == 2 * 32 * 16 * (4096 + 4096)
    assert res["total"] == res["base"] + res["trainable"]
    assert res["base"] == pytest.approx(6.74e9, rel=0.02)
    assert res["trainable_pct"] == pytest.approx(100 * res["trainable"] / res["total"])
    table = format_table(res)
    assert f"{res['trainable']:,}" in table and "q_proj, v_proj" in table
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_count_all_linear_skips_lm_head() -> None:
    res = count(compose_train(["model=qwen2.5-0.5b", "adapter.target_modules=all-linear"]))
    assert res["adapted_modules"] == 24 * 7
    assert "lm_head" not in res["adapted_kinds"]


def test_count_bad_targets_raise() -> None:
    # (the CLI lets Hydra report the same ConfigError and exits non-zero; not re-run here to stay fast)
    with pytest.raises(ConfigError, match=r"adapter\.target_modules"):
        count(compose_train(["model=qwen2.5-0.5b", "adapter.target_modules=[nothing]"]))


def test_default_overrides_respect_user_values() -> None:
    argv = _with_defaults(["count", "model=tiny", "hydra.run.dir=/x"])
    assert argv[0] == "count" and argv[-2:] == ["model=tiny", "hydra.run.dir=/x"]
    assert "hydra.run.dir=." not in argv
    assert "hydra.output_subdir=null" in argv
    assert "hydra/job_logging=none" in argv
    assert "hydra/help=count" in argv  # conf/hydra/help/count.yaml


def test_default_overrides_follow_hydra_options() -> None:
    """Hydra's parser takes the overrides as one run of arguments: the added ones join the user's, and
    options with a value (``--config-dir DIR``) work on either side."""
    argv = _with_defaults(["count", "--config-dir", "/c", "local=x"])
    assert argv[:3] == ["count", "--config-dir", "/c"] and argv[-1] == "local=x" and "hydra.run.dir=." in argv
    argv = _with_defaults(["count", "--info"])
    assert argv[0] == "count" and argv[-1] == "--info" and "hydra.run.dir=." in argv


def test_router_parameters_are_shown_apart_hydralora_paper_share() -> None:
    """HydraLoRA's 0.341% (methods.md §1: LLaMA-2-7B, r=8 on q,v, 10 B-heads) excludes the router."""
    qv = "adapter.target_modules=[q_proj,v_proj]"
    cfg = compose_train(
        ["model=llama2-7b", "adapter=hydralora", "adapter.rank=8", "adapter.num_heads=10", qv]
    )
    res = count(cfg)
    d, layers = 4096, 2 * 32
    router = layers * 10 * d  # W_r: heads x d_in per layer
    assert res["router"] == router
    assert res["trainable"] == layers * (8 * d + 10 * d * 8) + router  # A + 10 B-heads + router
    assert res["trainable_pct"] == pytest.approx(0.3798, abs=1e-4)
    no_router = 100 * (res["trainable"] - router) / (res["total"] - router)
    assert res["trainable_pct_no_router"] == pytest.approx(no_router)
    assert round(res["trainable_pct_no_router"], 3) == 0.341  # the paper's number
    table = format_table(res)
    assert table_value(table, "router/gate parameters") == f"{router:,}"
    assert table_value(table, "trainable % w/o router") == "0.3412%"
    assert len({len(line) for line in table.splitlines()}) == 1


@pytest.mark.parametrize(
    ("adapter", "router_per_layer"),
    [("lora", 0), ("mlora", 0), ("moelora", (4 + 1) * 64 + 4 * 64), ("mtl_lora", 4 * 3)],
)
def test_router_count_per_adapter(adapter: str, router_per_layer: int) -> None:
    """Task gates count as router: MOELoRA's task embedding ((tasks + 1) x 64, as the released code) and gate
    (experts x 64), MTL-LoRA's task mixing logits (tasks x up-projections); 4 tasks in the default mixture."""
    cfg = compose_train(["model=llama2-7b", f"adapter={adapter}", "adapter.target_modules=[q_proj,v_proj]"])
    res = count(cfg)
    assert res["router"] == 64 * router_per_layer
    if not router_per_layer:
        assert res["trainable_pct_no_router"] == pytest.approx(res["trainable_pct"])
    else:
        assert res["trainable_pct_no_router"] < res["trainable_pct"]


# ---------------------------------------------------------------- LoraHub: the composed LoRA and its library

# LLaMA-2-7B from its shapes: untied embedding and lm_head (32000 x 4096), 32 layers of q,k,v,o (4096²),
# gate/up/down (4096 x 11008) and two RMSNorms, the final norm
LLAMA2_7B = 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
QV_LORA = lambda r: 32 * 2 * r * (4096 + 4096)  # noqa: E731  r x (d_in + d_out) on q and v of 32 layers


@pytest.mark.parametrize(
    ("preset", "k", "rank", "reported_pct"),
    [
        # HydraLoRA Table 3 / Align-LoRA Table 2: LoraHub 1.240% = 20 LoRAs r=8 on q,v ("infer 20/20"); the
        # paper multiplied the rounded LoRA share (20 x 0.062), the exact count is 1.2296%
        ("hydralora/t3/lorahub", 20, 8, 1.23),
        # mtLoRA main table: LoRAHub 75.5M (1.11%) = 9 LoRAs r=16 on q,v
        ("mtlora/main/lorahub_bbh", 9, 16, 1.11),
    ],
)
def test_lorahub_count_shows_the_composed_lora_and_the_library(preset, k, rank, reported_pct) -> None:
    res = count(compose_train([f"experiment={preset}", f"adapter.num_modules={k}"]))
    assert res["base"] == LLAMA2_7B
    assert res["trainable"] == QV_LORA(rank)  # the one composed LoRA
    assert (res["library_modules"], res["library_source"]) == (k, "adapter.num_modules")
    assert res["library_trainable"] == k * QV_LORA(rank)
    assert res["library_pct"] == pytest.approx(100 * k * QV_LORA(rank) / (LLAMA2_7B + k * QV_LORA(rank)))
    assert round(res["library_pct"], 2) == reported_pct
    table = format_table(res)
    assert table_value(table, "trainable parameters") == f"{QV_LORA(rank):,}"
    assert table_value(table, "LoraHub library LoRAs") == f"{k} (adapter.num_modules)"
    assert table_value(table, "library parameters") == f"{k * QV_LORA(rank):,}"
    assert table_value(table, "library % (K x trainable)") == f"{res['library_pct']:.4f}%"
    assert len({len(line) for line in table.splitlines()}) == 1


def test_lorahub_library_size_from_run_dirs_else_one_per_data_task(tmp_path: Path) -> None:
    base = ["model=llama2-7b", "adapter=lorahub", "adapter.target_modules=[q_proj,v_proj]"]
    # no num_modules, no library on disk: one LoRA per task of the data mixture (4 synthetic tasks)
    res = count(compose_train(base))
    assert (res["library_modules"], res["library_source"]) == (4, "one per data task")
    assert res["library_trainable"] == 4 * res["trainable"] == 4 * QV_LORA(8)
    # library run dirs found: their number
    for i in range(3):
        (tmp_path / f"lib{i}").mkdir()
    res = count(compose_train([*base, f"adapter.library_glob={tmp_path}/lib*"]))
    assert (res["library_modules"], res["library_source"]) == (3, "library run dirs")
    # other adapters: no library rows
    assert "library_modules" not in count(compose_train(["model=llama2-7b", "adapter=lora"]))
    assert "library" not in format_table(count(compose_train(["model=llama2-7b", "adapter=lora"])))
