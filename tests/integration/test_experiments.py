"""Every paper-table preset ``conf/experiment/<paper>/<table>/<cell>.yaml``: composes and validates with its
real settings, documents itself (header + report key match its path), trains 2 steps on the tiny model; all
trained cells of a table share their mixture and batching; Base rows (``base.yaml``: the base model evaluated,
no adapter) leave a run dir that fills the table's Base cell; ``make table-<paper>-<table> SMOKE=1`` plans
commands that run offline for every table, and one small table runs end to end through its report.

The 2-step runs and the end-to-end table are ``slow``: ``make test-experiments`` runs all of this file
(= ``pytest -m 'slow or not slow' tests/integration/test_experiments.py``).
They substitute only what this machine cannot do: ``model=tiny`` (no hub weights), ``data=synthetic`` (every
preset's data is hub-only), no evaluation suites, fp32, a micro-batch of 8 (2 rows per synthetic task) and one
micro-batch per step, except for alignment presets, which keep their accumulation (their statistics come from
the rows of a whole step: 2 x GA rows per task). The adapter, alignment loss, routing and procedure stay the
preset's.
LoraHub presets compose a small library of two tiny LoRAs trained first with the preset's LoRA shape.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtlora.config.validate import validate_config
from mtlora.data.batching import rows_per_task
from mtlora.errors import ConfigError
from mtlora.eval.mmlu import load_subject
from mtlora.evaluate import evaluate
from mtlora.report import aggregate, render, run_dirs, run_table
from mtlora.train import preflight, run
from tests.helpers.compose import CONF, REPO, compose_train
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
# a Base row's evaluation on the tiny model: BBH capped (the data is in MTLORA_DATA_DIR)
TINY_BASE = [
    "model=tiny",
    "data=synthetic",
    "logger=none",
    "eval.bbh.tasks=[navigate]",
    "eval.bbh.limit=1",
    "eval.bbh.max_new_tokens=8",
]
TABLES = sorted({p.rsplit("/", 1)[0] for p in PRESETS})


def _is_base(preset: str) -> bool:
    return preset.endswith("/base")


def test_every_paper_table_has_presets() -> None:
    found: dict[str, set[str]] = {}
    for p in PRESETS:
        paper, table, _ = p.split("/")
        found.setdefault(paper, set()).add(table)
    assert found == EXPECTED_TABLES


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates_with_its_real_settings(preset: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={preset}"], run_dir=tmp_path)
    if _is_base(preset):  # no adapter: evaluated by mtlora.evaluate, refused by mtlora.train
        assert cfg.adapter.method == "none" and list(cfg.eval.suites) == ["bbh"]
        with pytest.raises(ConfigError, match="mtlora.evaluate"):
            preflight(cfg)
    else:
        validate_config(cfg)
        if (
            cfg.adapter.method != "lorahub"
        ):  # LoraHub's preflight needs its library (the slow test builds one)
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
    if _is_base(preset):
        assert keys["command"] == f"python -m mtlora.evaluate experiment={preset} out=<run dir>"
    else:
        assert keys["command"] == f"python -m mtlora.train experiment={preset}"
    # every command line in the header (other models of the table) selects this very preset
    for cmd in re.findall(r"python -m mtlora\.(?:train|evaluate) (\S+)", "\n".join(header)):
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
    if _is_base(preset):  # nothing to train: its evaluation of the base model
        d = tmp_path / "base"
        evaluate(compose_train([f"experiment={preset}", *TINY_BASE], run_dir=d), {"out": str(d)})
        assert (d / "COMPLETED").is_file() and list((d / "metrics").glob("eval_bbh_*.json"))
        return
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
    tiny = TINY
    if probe.alignment.name != "none":  # the preset's accumulation window (alignment.window=step)
        tiny = [o for o in TINY if not o.startswith("train.gradient_accumulation_steps=")]
    d = train_tiny(tmp_path, "run", [f"experiment={preset}", *tiny])
    cfg = compose_train([f"experiment={preset}", *tiny], run_dir=d)
    assert cfg.adapter.method == probe.adapter.method and cfg.alignment.name == probe.alignment.name
    lines = (d / "metrics" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 2


@pytest.mark.parametrize("table", TABLES)
def test_trained_cells_of_a_table_share_mixture_and_batching(table: str, tmp_path: Path) -> None:
    """Rows differ in the method only: per training data (a table's columns may use two), every trained cell
    has the same sampling, budget, task selection and effective batching (rows of each task per micro-batch,
    None = shuffled; micro-batch size and micro-batches per optimizer step)."""
    seen: dict[str, dict[str, object]] = {}
    for preset in (p for p in PRESETS if p.startswith(table + "/")):
        cfg = compose_train([f"experiment={preset}"], run_dir=tmp_path)
        if cfg.adapter.method in ("none", "lorahub"):  # nothing trained on the mixture
            continue
        mixture = {
            "sampling": OmegaConf.to_container(cfg.data.sampling),
            "budget": cfg.data.budget,
            "select": OmegaConf.to_container(cfg.data.select) if cfg.data.select else None,
            "rows_per_task": rows_per_task(cfg),
            "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        }
        first = seen.setdefault(cfg.data.name, {"preset": preset, **mixture})
        assert mixture == {k: v for k, v in first.items() if k != "preset"}, (preset, first["preset"])


def test_base_row_run_dir_fills_the_base_cell(tmp_path: Path) -> None:
    """``python -m mtlora.evaluate experiment=<paper>/<table>/base out=DIR`` leaves a finished run dir with the
    preset's report key, which make_tables reads as the Base row; ``mtlora.train`` refuses the preset."""
    runs = tmp_path / "runs" / "hydralora_t3"
    d = runs / "tiny" / "base" / "s0"
    evaluate(compose_train(["experiment=hydralora/t3/base", *TINY_BASE], run_dir=d), {"out": str(d)})
    assert (d / "COMPLETED").is_file() and not (d / "RUNNING").exists()
    saved = OmegaConf.load(d / "config_resolved.yaml")
    assert OmegaConf.to_container(saved.adapter) == {"name": "none", "method": "none"}
    assert dict(saved.report) == {"paper": "hydralora", "table": "t3", "cell": "base"}
    numbers = aggregate.load_paper_numbers()
    spec = aggregate.table_spec(numbers, "hydralora", "t3")
    table = aggregate.build_table(run_dirs.collect_runs([runs]), spec, numbers)
    base = next(r for r in table.rows if r.cell == "base")
    assert base.ours["tiny"] is not None and base.ours["tiny"].n == 1
    assert base.paper["llama2-7b"] == 31.6 and "| Base (no adapter) | base |" in render.to_markdown(table)
    assert not table.failed and not table.no_metric
    with pytest.raises(ConfigError, match="mtlora.evaluate"):
        run(compose_train(["experiment=hydralora/t3/base", *TINY], run_dir=tmp_path / "t"), tmp_path / "t")
    # a base-model evaluation never overwrites a trained run's record
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config_resolved.yaml").write_text("adapter: {name: lora, method: lora}\n")
    (trained / "COMPLETED").write_text("")
    with pytest.raises(ConfigError, match="adapter.method='lora'"):
        evaluate(
            compose_train(["experiment=hydralora/t3/base", *TINY_BASE], run_dir=trained),
            {"out": str(trained)},
        )
    assert (trained / "COMPLETED").is_file() and "lora" in (trained / "config_resolved.yaml").read_text()


@pytest.mark.parametrize("table", TABLES)
def test_smoke_table_plan_runs_offline(table: str, tmp_path: Path) -> None:
    """``make table-<paper>-<table> SMOKE=1``'s commands (mtlora.report.run_table --smoke): every one composes
    on the tiny model with synthetic data and passes its checks; MMLU reads the generated local fixture (not
    the hub); LoraHub cells get their library built first; Base rows are evaluations."""
    paper, tbl = table.split("/")
    steps = run_table.plan(
        paper, tbl, [0], smoke=True, runs_dir=tmp_path / "runs", reports_dir=tmp_path / "rep"
    )
    kinds = [s.kind for s in steps]
    assert kinds[0] == "mmlu_fixture" and kinds[-1] == "report"
    run_table.write_mmlu_fixture(steps[0].run_dir)
    libraries: list[Path] = []
    cells = set()
    for step in steps[1:-1]:
        cfg = compose_train(step.overrides, run_dir=tmp_path / "probe")
        assert cfg.model.name == "tiny" and {t.source.type for t in cfg.data.tasks.values()} == {"synthetic"}
        if "mmlu" in cfg.eval.suites:
            assert cfg.eval.mmlu.data_dir == str(steps[0].run_dir)
            for subject in cfg.eval.mmlu.subjects:
                assert load_subject(subject, cfg.eval.mmlu.data_dir)[1]
        if step.kind == "library":
            assert cfg.adapter.method == "lora" and cfg.report.cell is None and not cfg.eval.suites
            preflight(cfg)
            libraries.append(step.run_dir)
        elif step.kind == "evaluate":
            assert cfg.adapter.method == "none" and step.argv[2] == "mtlora.evaluate"
        else:
            assert step.kind == "train" and step.argv[2] == "mtlora.train" and "resume=auto" in step.argv
            validate_config(cfg)
            if cfg.adapter.method == "lorahub":
                assert cfg.adapter.library_glob == f"{libraries[-1]}/*"  # built by the step before
            else:
                preflight(cfg)
        cells.add(cfg.report.cell)
    presets_of_table = {p.rsplit("/", 1)[1] for p in PRESETS if p.startswith(table + "/")}
    assert presets_of_table <= cells


def test_make_table_target_calls_the_table_runner(tmp_path: Path) -> None:
    r = subprocess.run(
        ["make", "-n", "-o", ".make/install.stamp", "table-hydra-t3", "SMOKE=1", "SEEDS=0 1",
         f"TABLES_DIR={tmp_path}/t", f"REPORTS_DIR={tmp_path}/r", "ARGS=logger=none"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cmd = " ".join(r.stdout.replace("\\\n", " ").split())
    assert f"-m mtlora.report.run_table hydra-t3 --seeds 0 1 --smoke --runs-dir {tmp_path}/t" in cmd
    assert f"--reports-dir {tmp_path}/r --plot per-task -- logger=none" in cmd


@pytest.mark.slow
def test_smoke_table_runs_end_to_end_through_the_report(tmp_path: Path) -> None:
    """HydraLoRA Table 3 with SMOKE=1 (Base row, three trained cells, LoraHub with its library), offline on the
    CPU, into table.md with every row filled (about 1.5 min)."""
    r = subprocess.run(
        [sys.executable, "-m", "mtlora.report.run_table", "hydra-t3", "--smoke", "--seeds", "0",
         "--runs-dir", str(tmp_path / "t"), "--reports-dir", str(tmp_path / "r")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    md = (tmp_path / "r" / "hydralora_t3" / "table.md").read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| ") and " | " in line}
    for cell in ("base", "lora", "lorahub", "lora_moe", "hydralora"):
        assert "(1) |" in rows[cell], rows[cell]  # ours: one seed on the tiny model
    assert "FAILED" not in md and "no `bbh_macro` metrics file" not in md
    assert len(list((tmp_path / "t" / "lorahub_library").glob("*/*/*/*/COMPLETED"))) == 4  # one LoRA per task
