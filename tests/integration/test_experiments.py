"""Every paper-table preset ``conf/experiment/<paper>/<table>/<cell>.yaml``: composes and validates with its
real settings, documents itself (header + report key match its path), and trains 2 steps on the tiny model.

The 2-step runs are ``slow``: ``make test-experiments`` runs all of this file
(= ``pytest -m 'slow or not slow' tests/integration/test_experiments.py``).
They substitute only what this machine cannot do: ``model=tiny`` (no hub weights), ``data=synthetic`` (every
preset's data is hub-only), no evaluation suites, fp32, a micro-batch of 8 (2 rows per synthetic task, so that
alignment has a variance to estimate). The adapter, alignment loss, routing and procedure stay the preset's.
LoraHub presets compose a small library of two tiny LoRAs trained first with the preset's LoRA shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtlora.config.validate import validate_config
from mtlora.train import preflight, run
from tests.helpers.compose import CONF, compose_train
from tests.helpers.training import train_tiny

EXP = CONF / "experiment"
PAPERS = ("align_lora", "rlora", "hydralora", "mtlora", "mtl_lora")
PRESETS = sorted(str(p.relative_to(EXP).with_suffix("")) for p in EXP.glob("*/*/*.yaml"))
EXPECTED_TABLES = {
    "align_lora": {"t1", "t2", "t3", "t4", "t5"},
    "rlora": {"t3", "t4", "t5"},
    "hydralora": {"t3"},
    "mtlora": {"main", "ablation"},
    "mtl_lora": {"commonsense"},
}
# what this machine cannot do, substituted in the 2-step runs (everything else is the preset's)
TINY = [
    "model=tiny",
    "model.max_seq_len=96",
    "data=synthetic",
    "data.budget=128",
    "eval.suites=[]",
    "eval.at_end=false",
    "logger=none",
    "debug=smoke",
    "train.max_steps=2",
    "train.micro_batch_size=8",
    "train.gradient_accumulation_steps=1",
    "train.precision=fp32",
]


def test_every_paper_table_has_presets() -> None:
    found: dict[str, set[str]] = {}
    for p in PRESETS:
        paper, table, _ = p.split("/")
        found.setdefault(paper, set()).add(table)
    assert found == EXPECTED_TABLES


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates_with_its_real_settings(preset: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={preset}"], run_dir=tmp_path)
    validate_config(cfg)
    if (
        cfg.adapter.method != "lorahub"
    ):  # LoraHub's preflight needs its trained library (the slow test builds one)
        preflight(cfg)  # target modules checked on the meta device for the real model, nothing downloaded
    paper, table, cell = preset.split("/")
    assert dict(cfg.report) == {"paper": paper, "table": table, "cell": cell}
    assert cfg.model.name != "tiny" and cfg.data.name != "synthetic"
    assert all(t.source.type == "hub" for t in cfg.data.tasks.values())
    assert cfg.run_name.startswith(f"{paper}-{table}-{cell}-") and "/" not in cfg.run_name
    assert {paper, table, cell} <= set(cfg.tags)
    if "bbh" in cfg.eval.suites:
        assert cfg.eval.bbh.protocol in ("align_lora", "mtlora_direct", "opencompass_cot")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_names_paper_table_cell_and_its_command(preset: str) -> None:
    text = (EXP / f"{preset}.yaml").read_text()
    header = text.split("\ndefaults:", 1)[0].splitlines()
    assert header[0] == "# @package _global_"
    assert all(line.startswith("#") for line in header)
    paper, table, cell = preset.split("/")
    marks = (re.match(r"# (paper|table|cell|reported|command)\b[^:]*:\s+(.*)", x) for x in header)
    keys = {m.group(1): m.group(2) for m in marks if m}
    assert set(keys) == {"paper", "table", "cell", "reported", "command"}, header
    assert keys["table"].split()[0] == table and keys["cell"].split()[0] == cell
    assert keys["command"] == f"python -m mtlora.train experiment={preset}"
    # every command line in the header (other models of the table) selects this very preset
    for cmd in re.findall(r"python -m mtlora\.train (\S+)", "\n".join(header)):
        assert cmd == f"experiment={preset}"
    assert "# choices where the paper is silent:" in header


def _lorahub_library(preset: str, tmp_path: Path) -> list[str]:
    """Two tiny task LoRAs with the preset's LoRA shape (rank, alpha, targets), for its composition."""
    shape = compose_train([f"experiment={preset}", *TINY], run_dir=tmp_path / "probe").adapter
    dirs = []
    for task in ("arithmetic", "counting"):
        d = tmp_path / f"lib_{task}"
        over = [
            *TINY,
            "adapter=lora",
            f"adapter.rank={shape.rank}",
            f"adapter.alpha={shape.alpha}",
            f"adapter.use_rslora={str(shape.use_rslora).lower()}",
            f"adapter.target_modules=[{','.join(shape.target_modules)}]",
            f"data.select=[{task}]",
        ]
        run(compose_train(over, run_dir=d), d)
        dirs.append(str(d))
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_steps_on_the_tiny_model(preset: str, tmp_path: Path) -> None:
    probe = compose_train([f"experiment={preset}", *TINY], run_dir=tmp_path / "probe0")
    if probe.adapter.method == "lorahub":
        lib = _lorahub_library(preset, tmp_path)
        over = [
            f"experiment={preset}",
            *TINY,
            f"adapter.library=[{','.join(lib)}]",
            "adapter.library_glob=null",
            "adapter.num_modules=null",
            "adapter.budget=2",
            "adapter.fewshot_per_task=2",
            "data.select=[arithmetic,counting]",
        ]
        d = tmp_path / "compose"
        d.mkdir()
        run(compose_train(over, run_dir=d), d)
        assert (d / "metrics" / "lorahub.json").is_file()
        return
    d = train_tiny(tmp_path, "run", [f"experiment={preset}", *TINY])
    cfg = compose_train([f"experiment={preset}", *TINY], run_dir=d)
    assert cfg.adapter.method == probe.adapter.method and cfg.alignment.name == probe.alignment.name
    lines = (d / "metrics" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 2
