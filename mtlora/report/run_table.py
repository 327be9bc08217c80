"""``python -m mtlora.report.run_table <paper>-<table>`` (``make table-<paper>-<table>``): every cell of a paper
table x seeds, then its report.

    python -m mtlora.report.run_table align-t4 --model qwen2.5-7b --seeds 42 0 1
    python -m mtlora.report.run_table hydra-t3 --smoke --seeds 0 [--dry-run] [-- extra overrides]

``<paper>`` is an id of docs/paper_numbers.yaml (``align``, ``hydra``, ``mtl`` are short for align_lora,
hydralora, mtl_lora). Each preset ``conf/experiment/<paper>/<table>/<cell>.yaml`` runs into
``<runs>/<paper>_<table>/<model>/<cell>/s<seed>/`` (a COMPLETED run is skipped, any other is resumed with
``resume=auto``); ``<model>`` is ``--model`` (passed as ``model=``) or ``preset_model`` (each preset's own).
How a cell runs depends on its adapter:

* trained cells: ``python -m mtlora.train experiment=<preset> seed=<s> resume=auto hydra.run.dir=<dir>``;
* Base rows (``adapter.method: none``, the ``base.yaml`` presets): ``python -m mtlora.evaluate
  experiment=<preset> out=<dir>``, once per model (the first seed: nothing is trained and decoding is greedy);
* LoraHub cells (``adapter.method: lorahub``): first their library, one plain LoRA per task of the cell's data
  with the cell's LoRA shape (rank, alpha, targets), model and training settings (a ``mtlora.train -m`` sweep
  over ``data.select``, evaluation off) into ``<runs>/lorahub_library/<paper>_<table>/<model>/<cell>/<task>/``
  (only the tasks not COMPLETED there), then the composition with ``adapter.library_glob`` set to it. Without
  ``--smoke``, a preset whose own ``adapter.library_glob`` already matches COMPLETED runs (a library built
  with ``make lorahub``) keeps it. The composition (mtlora.procedures.lorahub) runs the cell's evaluation suites itself.

Then scripts/make_tables.py writes ``<reports>/<paper>_<table>/table.{md,csv,tex}`` (ours beside the
paper's numbers) and the ``--plot`` plots. ``--smoke``: the tiny model on synthetic data, a few steps, and
evaluations capped so that nothing needs the network: BBH on two tasks from ``$MTLORA_DATA_DIR/bbh``, MMLU on
a tiny local fixture in the Hendrycks layout written to ``<runs>/smoke_mmlu`` (MMLU otherwise comes from the
hub), small LoraHub budgets. Extra overrides (after ``--``) go to every command. Exit status 1 when a run
or the report failed (the report lists the failed runs), else 0.
"""

from __future__ import annotations

import argparse
import csv
import glob
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlora.adapters.registry import get_spec
from mtlora.errors import ConfigError
from mtlora.utils.paths import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
CONF = CONF_DIR  # the checkout's conf/, or the installed package's mtlora/conf
ALIASES = {"align": "align_lora", "hydra": "hydralora", "mtl": "mtl_lora"}
SEEDS = (42, 0, 1)
SMOKE_SEEDS = (0, 1)
PRESET_MODEL = "preset_model"  # the model dir name when every preset keeps its own model
SMOKE_MMLU_SUBJECTS = ("anatomy", "virology")
# --smoke: what this machine cannot do otherwise (no hub weights or data, no GPU), the rest is the preset's;
# alignment cells keep their gradient accumulation (their statistics come from the rows of a whole step)
SMOKE_RUN = [
    "model=tiny",
    "data=synthetic",
    "debug=smoke",
    "model.max_seq_len=96",
    "train.precision=fp32",
    "train.gradient_checkpointing=false",
    "train.micro_batch_size=8",
    "train.gradient_accumulation_steps=1",
    "++eval.max_examples_per_task=8",
    "++eval.bbh.tasks=[boolean_expressions,navigate]",
    "++eval.bbh.limit=1",
    "++eval.bbh.max_new_tokens=16",
    "++eval.heldin_gen.limit=4",
    "++eval.heldin_gen.max_new_tokens=16",
    "++eval.mmlu.limit=2",
    f"++eval.mmlu.subjects=[{','.join(SMOKE_MMLU_SUBJECTS)}]",
]
SMOKE_LORAHUB = ["adapter.budget=4", "adapter.fewshot_per_task=2"]


@dataclass
class Step:
    """One command of the table's pipeline. ``overrides``: the config of one of its jobs (for checks)."""

    kind: str  # mmlu_fixture | library | train | evaluate (base model) | report
    label: str
    argv: list[str]
    run_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    done: bool = False  # COMPLETED already: skipped

    def command(self) -> str:
        return shlex.join(self.argv)


def resolve_table(name: str, table: str | None = None) -> tuple[str, str]:
    """``("align_lora", "t4")`` for ``"align-t4"`` (or ``name="align_lora", table="t4"``)."""
    if table is None:
        if "-" not in name:
            raise ConfigError(f"table {name!r}: expected <paper>-<table>, e.g. align-t4")
        name, table = name.rsplit("-", 1)
    return ALIASES.get(name, name), table


def presets(paper: str, table: str) -> list[str]:
    found = sorted((CONF / "experiment" / paper / table).glob("*.yaml"))
    if not found:
        raise ConfigError(f"table {paper}-{table}: no presets conf/experiment/{paper}/{table}/*.yaml")
    return [f"{paper}/{table}/{p.stem}" for p in found]


def compose(overrides: list[str]) -> DictConfig:
    """The train config for ``overrides`` (not resolved: ``${hydra:...}`` stays as it is)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mtlora.utils.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def write_mmlu_fixture(root: Path, subjects=SMOKE_MMLU_SUBJECTS) -> Path:
    """A tiny MMLU in the Hendrycks CSV layout (5 dev and 2 test questions per subject), for offline smoke
    runs of MMLU cells: ``eval.mmlu.data_dir=<root>``."""
    for split, n in (("dev", 5), ("test", 2)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            with (root / split / f"{s}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(
                    [f"{s} {split} question {i}: which letter?", "a", "b", "c", "d", "ABCD"[i % 4]]
                    for i in range(n)
                )
    return root


def _completed(d: Path) -> bool:
    return (d / "COMPLETED").is_file()


def _not_lora_keys(overrides: list[str]) -> list[str]:
    """Adapter keys of ``overrides`` (with ``adapter=lora``) that a plain LoRA does not have: the LoraHub
    preset's own (library_glob, fewshot_per_task, ...), dropped for its library runs (Hydra cannot delete a
    null one; it stays, unused)."""
    lora = OmegaConf.load(CONF / "adapter" / "lora.yaml")
    adapter = compose(overrides).adapter
    return [k for k in adapter if k not in lora and adapter[k] is not None]


def plan(
    paper: str,
    table: str,
    seeds: list[int] | None = None,
    model: str | None = None,
    smoke: bool = False,
    runs_dir: Path | str = "outputs/tables",
    reports_dir: Path | str = "reports",
    plots: list[str] | None = None,
    extra: list[str] | None = None,
    python: str = sys.executable,
) -> list[Step]:
    """The pipeline of one table as commands (nothing runs). See the module doc."""
    seeds = list(seeds or (SMOKE_SEEDS if smoke else SEEDS))
    extra = list(extra or [])
    runs_dir, reports_dir = Path(runs_dir), Path(reports_dir)
    model_dir = "tiny" if smoke else (model or PRESET_MODEL)
    out = runs_dir / f"{paper}_{table}" / model_dir
    run = list(SMOKE_RUN) if smoke else ([f"model={model}"] if model else [])
    steps: list[Step] = []
    if smoke:
        fixture = runs_dir / "smoke_mmlu"
        run.append(f"++eval.mmlu.data_dir={fixture}")
        steps.append(Step("mmlu_fixture", f"tiny MMLU fixture -> {fixture}", [], fixture))
    train = [python, "-m", "mtlora.train"]
    for preset in presets(paper, table):
        cell = preset.rsplit("/", 1)[1]
        cfg = compose([f"experiment={preset}", *run, *extra])
        method = cfg.adapter.get("method")
        cell_run = list(run)
        if smoke and cfg.alignment.get("name", "none") != "none":  # statistics over the preset's whole step
            cell_run = [o for o in run if not o.startswith("train.gradient_accumulation_steps=")]
        spec = get_spec(method)
        if spec is not None and spec.composes_library:  # LoraHub: first a library of one LoRA per task
            lib = runs_dir / "lorahub_library" / f"{paper}_{table}" / model_dir / cell
            own = str(cfg.adapter.get("library_glob") or "")
            if not smoke and own and any(_completed(Path(d)) for d in glob.glob(own)):
                print(f"{preset}: library {own} (its adapter.library_glob) holds finished runs: using it")
            else:
                tasks = list(cfg.data.get("select") or cfg.data.tasks)
                todo = [t for t in tasks if not _completed(lib / t)]
                lib_over = [f"experiment={preset}", *run, "adapter=lora"]
                lib_over += [
                    *(f"~adapter.{k}" for k in _not_lora_keys([*lib_over, *extra])),
                    "report.paper=null",
                    "report.table=null",
                    "report.cell=null",
                    "eval.suites=[]",  # not eval=none: the preset overrides eval/bbh
                    "eval.at_end=false",
                    f"seed={seeds[0]}",
                    "run_name=lorahub_library-${data.select.0}-${model.name}-s${seed}",
                ]
                steps.append(
                    Step(
                        "library",
                        f"{preset}: LoraHub library, one LoRA per task ({len(todo)} of {len(tasks)} to train)",
                        [
                            *train,
                            "-m",
                            *lib_over,
                            f"data.select={','.join(f'[{t}]' for t in todo or tasks)}",
                            f"hydra.sweep.dir={lib}",
                            "hydra.sweep.subdir=${data.select.0}",
                            "resume=auto",
                            *extra,
                        ],
                        lib,
                        [*lib_over, f"data.select=[{tasks[0]}]", *extra],
                        done=not todo,
                    )
                )
                cell_run.append(f"adapter.library_glob={lib}/*")
            if smoke:
                cell_run += SMOKE_LORAHUB
        for seed in seeds[:1] if method == "none" else seeds:
            d = out / cell / f"s{seed}"
            over = [f"experiment={preset}", f"seed={seed}", *cell_run, *extra]
            if method == "none":  # a Base row: evaluate the base model, nothing to train
                argv = [python, "-m", "mtlora.evaluate", *over, f"out={d}"]
                steps.append(Step("evaluate", f"{preset} (base model) -> {d}", argv, d, over, _completed(d)))
            else:
                argv = [*train, *over, "resume=auto", f"hydra.run.dir={d}"]
                steps.append(Step("train", f"{preset} seed {seed} -> {d}", argv, d, over, _completed(d)))
    report = [
        python,
        str(REPO / "scripts" / "make_tables.py"),
        "--runs",
        str(runs_dir / f"{paper}_{table}"),
        "--paper",
        paper,
        "--table",
        table,
        "--out",
        str(reports_dir / f"{paper}_{table}"),
    ]
    for p in plots or []:
        report += ["--plot", p]
    steps.append(Step("report", f"report -> {reports_dir / f'{paper}_{table}'}", report))
    return steps


def execute(steps: list[Step], dry_run: bool = False) -> int:
    """Run ``steps`` in order (a failed run does not stop the others; a failed library skips its LoraHub
    cells); 1 when any failed."""
    failed: list[str] = []
    bad: set[Path] = set()  # failed libraries and runs: what depends on them is skipped
    for step in steps:
        if step.done:
            print(f"done already: {step.kind} {step.run_dir}", flush=True)
            continue
        if step.kind == "train" and any(f"adapter.library_glob={lib}/*" in step.argv for lib in bad):
            print(f"SKIPPED (its LoraHub library failed): {step.run_dir}", flush=True)
            failed.append(step.label)
            bad.add(step.run_dir)
            continue
        print(f">>> {step.label}" + (f"\n    {step.command()}" if step.argv else ""), flush=True)
        if dry_run:
            continue
        if step.kind == "mmlu_fixture":
            write_mmlu_fixture(step.run_dir)
            continue
        if subprocess.run(step.argv, cwd=Path.cwd()).returncode != 0:
            print(f"FAILED: {step.label}", flush=True)
            failed.append(step.label)
            bad.add(step.run_dir)
            if step.kind == "report":
                return 1
    if failed:
        print(f"\n{len(failed)} step(s) failed:\n  " + "\n  ".join(failed), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", help="<paper>-<table>, e.g. align-t4 or hydralora-t3")
    p.add_argument(
        "--seeds", nargs="+", type=int, help=f"default {list(SEEDS)} ({list(SMOKE_SEEDS)} with --smoke)"
    )
    p.add_argument("--model", help="model preset for every cell (default: each preset's own)")
    p.add_argument("--smoke", action="store_true", help="tiny model, synthetic data, offline, a few steps")
    p.add_argument("--runs-dir", default="outputs/tables")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--plot", action="append", default=[], help="make_tables.py --plot (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.epilog = "Overrides for every command follow a --, e.g. -- train.max_steps=10"
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    paper, table = resolve_table(a.table)
    steps = plan(paper, table, a.seeds, a.model, a.smoke, a.runs_dir, a.reports_dir, a.plot, argv[cut + 1 :])
    return execute(steps, a.dry_run)


if __name__ == "__main__":
    from mtlora.cli.entry import run_main

    sys.exit(run_main(main))
