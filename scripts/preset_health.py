"""Preset health: every experiment preset trains, checked in smoke form on the tiny model.

For each paper preset ``conf/experiment/<paper>/<table>/<cell>.yaml`` this trains the preset for ``--steps``
optimizer steps (default 30) and, under the same batch settings, a plain LoRA reference, then judges:

* **loss fall** -- ``fall = mean(first k logged losses) − mean(last k)`` of the answer-token cross-entropy
  (``loss`` of ``metrics/train.jsonl``, logged every step; ``k = --window``, default ``steps // 6``);
  ``ratio = fall_preset / fall_lora`` must be ``>= --min-ratio`` (0.7);
* **auxiliary losses finite** -- every logged ``align_loss``, ``aux_loss`` (router balance) and ``reg_loss``
  (spectral regulariser);
* **bounded gradient norm** -- every logged (pre-clipping) ``grad_norm`` finite and ``<= --grad-factor``
  (100) x the reference's largest. On the tiny model the largest norm of every method that trains stayed
  within 2x LoRA's (more parameters, other scales); a term that diverges, like a KL alignment estimated from
  2 rows per task, drives it up by 9 orders of magnitude (clipping keeps the loss finite meanwhile), so the
  bound has margin on both sides.

**Smoke form.** Only what a CPU without the hub cannot do is substituted; the adapter, the alignment loss,
routing, the procedure, the optimizer and its schedule, dropout, and the batch structure (rows of each task
per micro-batch, gradient accumulation, ``data.batching``) stay the preset's:

* ``model=tiny`` (``model.max_seq_len=96``), ``data=synthetic`` with all five synthetic tasks, fp32, no
  gradient checkpointing (ours is non-reentrant: the same gradients), no evaluation, no logger;
* task-balanced presets keep their rows per task: micro-batch = rows per task x 5 synthetic tasks (so an
  8-task preset's 16 rows become 10); shuffled presets keep their micro-batch; gradient accumulation is kept;
* one learning rate ``--lr`` (default 1e-2) for every preset and its reference, instead of each preset's
  own (2e-4 barely moves a random-init model in 30 steps). At the tiny model's default 3e-3, methods whose
  released init starts the update near zero (MOELoRA's ``A ~ N(0, 0.01²)``, MultiLoRA's ``v = 0``) reach
  only 65% of LoRA's fall in 30 steps (97% in 60): that measures how fast an init starts, not whether a
  method trains. At 1e-2 LoRA still falls steadily (to its plateau by step ~20, gradient norm < 5);
* one seed (0); ``data.budget = steps x micro-batch x accumulation`` (the run is one epoch); 400 generated
  rows per synthetic task (tokenising the default 1,100 costs seconds per run);
* a regulariser on a step schedule (mtLoRA's spectral ``every_steps: 500``) fires every ``steps // 3``
  steps instead, so that it acts within the run.

**Reference.** ``adapter=lora``, ``alignment=none`` with the preset's rank, alpha, dropout, use_rslora and
target_modules (those it has), and the preset's smoke ``train``, ``data``, ``model`` and ``seed``: run once
per distinct setting and shared. Every run is cached by its config: a preset that *is* its reference (a
plain LoRA row, ratio 1) or whose smoke form equals another preset's (one method on two real datasets)
reuses that run.

**Special cases.** Base rows (``adapter.method=none``) evaluate the base model: skipped. LoraHub presets
are gradient-free: a library of one LoRA per synthetic task (the preset's LoRA shape and training settings,
``--steps`` steps each, shared per shape) is composed with the preset's budget and few-shot size; every
evaluated objective must be finite and the composition must lower the few-shot CE below the base model's
(the loaded composition's ``ce < ce_at_zero``, ``fall`` = the difference; ``metrics/lorahub.json``).

Writes ``<out>/preset_health.md`` and ``.csv`` (one row per preset) and exits 1 when a preset fails.

Usage::

    python scripts/preset_health.py                           # every preset: ~8 min of one CPU core
    python scripts/preset_health.py --presets 'align_lora/t4/*' 'rlora/*' --steps 30 --out outputs/health
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
EXP = CONF / "experiment"
sys.path.insert(0, str(REPO))

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict, read_write  # noqa: E402

from mtlora.data.batching import rows_per_task  # noqa: E402
from mtlora.utils.resolvers import register_resolvers  # noqa: E402

#: the synthetic tasks of a smoke run (data=synthetic's four and `reverse`)
SMOKE_TASKS = ("arithmetic", "word_sorting", "boolean_expressions", "counting", "reverse")
#: what this machine cannot do, substituted in every smoke run (the rest is the preset's)
SMOKE = [
    "model=tiny",
    "model.max_seq_len=96",
    "data=synthetic",
    "+data/task@data.tasks.reverse=synth_reverse",
    "eval.suites=[]",
    "eval.at_end=false",
    "logger=none",
    "diagnostics=none",
    "train.precision=fp32",
    "train.gradient_checkpointing=false",
    "train.log_every=1",
    "train.checkpoint_every=null",
    "train.loss_watchdog.enabled=false",  # the check measures a diverging run instead of aborting it
    # rows generated per synthetic task (364 train rows; a 30-step run draws at most ~600 per task and
    # cycles): the generator's default 1,100 take seconds per run to tokenise
    *(f"data.tasks.{t}.source.num_examples=400" for t in SMOKE_TASKS),
]
#: adapter keys that give the LoRA reference (and a LoraHub library) the preset's shape and scale
SHAPE_KEYS = ("rank", "alpha", "dropout", "use_rslora", "target_modules")
#: the parts of a composed config that decide what a smoke run computes (reference cache key)
RUN_KEYS = ("adapter", "alignment", "train", "data", "model", "seed")
LORAHUB_KEYS = ("rank", "alpha", "use_rslora", "target_modules")

log = logging.getLogger("preset_health")


def list_presets(patterns: list[str] | None = None) -> list[str]:
    """``<paper>/<table>/<cell>`` of every paper preset, filtered by shell-style ``patterns`` (any match)."""
    names = sorted(str(p.relative_to(EXP).with_suffix("")) for p in EXP.glob("*/*/*.yaml"))
    names = [n for n in names if not n.startswith("sweeps/")]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def compose(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` and resolved, as ``python -m mtlora.train`` does
    (``paths.output_dir`` = ``run_dir``)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir or REPO / "outputs" / "preset_health")
    HydraConfig.instance().set_config(cfg)
    hydra_node = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    _HYDRA[id(cfg)] = (cfg, hydra_node)
    return cfg


#: the Hydra node of every composed config (by id), restored before its run: validation reads the job's
#: overrides from ``HydraConfig`` (mtlora.config.reference), and other configs are composed in between
_HYDRA: dict[int, tuple[DictConfig, DictConfig]] = {}


def _activate(cfg: DictConfig) -> None:
    """Make ``cfg``'s own Hydra node the current ``HydraConfig``, as in a ``python -m mtlora.train`` job."""
    entry = _HYDRA.get(id(cfg))
    if entry is not None and entry[0] is cfg:
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": entry[1]}))


def _key(cfg: DictConfig) -> str:
    parts = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in RUN_KEYS}
    return json.dumps(parts, sort_keys=True, default=str)


@dataclass
class Plan:
    """What the check runs for one preset. ``kind``: ``skip`` (Base row), ``train`` or ``lorahub``."""

    preset: str
    kind: str
    method: str
    alignment: str
    overrides: list[str] = field(default_factory=list)
    rows_per_task: int | None = None
    micro_batch_size: int = 0
    grad_accum: int = 1
    note: str = ""


def plan(preset: str, steps: int = 30, lr: float = 1e-2, seed: int = 0) -> Plan:
    """The smoke-form overrides of ``preset``: its batch structure read from its real config."""
    real = compose([f"experiment={preset}"])
    method, alignment = str(real.adapter.method), str(real.alignment.get("name", "none"))
    if method == "none":
        return Plan(
            preset, "skip", method, alignment, note="Base row: evaluates the base model, trains nothing"
        )
    k = rows_per_task(real)
    mbs, ga = int(real.train.micro_batch_size), int(real.train.gradient_accumulation_steps)
    if k is not None:  # task-balanced: the same rows of each task per micro-batch, over the smoke tasks
        mbs = k * len(SMOKE_TASKS)
    over = [
        f"experiment={preset}",
        *SMOKE,
        f"train.micro_batch_size={mbs}",
        f"train.max_steps={steps}",
        f"train.optimizer.lr={lr}",
        f"seed={seed}",
        f"data.budget={steps * mbs * ga}",
    ]
    spectral = real.adapter.get("spectral")
    if spectral and spectral.get("mode", "none") != "none" and spectral.get("lambda"):
        every = spectral.get("every_steps")
        if every is None or int(every) > max(1, steps // 3):
            over.append(f"adapter.spectral.every_steps={max(1, steps // 3)}")
    kind = "lorahub" if method == "lorahub" else "train"
    return Plan(preset, kind, method, alignment, over, k, mbs, ga)


@dataclass
class RunStats:
    """The logged series of one smoke run (``error``: the exception that ended it, if any)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    aux: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @classmethod
    def read(cls, run_dir: Path) -> RunStats:
        path = run_dir / "metrics" / "train.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        aux: dict[str, list[float]] = {}
        for r in recs:
            for key in ("align_loss", "aux_loss", "reg_loss"):
                if key in r:
                    aux.setdefault(key, []).append(float(r[key]))
        return cls(
            losses=[float(r["loss"]) for r in recs],
            grad_norms=[float(r["grad_norm"]) for r in recs if r.get("grad_norm") is not None],
            aux=aux,
        )


def loss_fall(losses: list[float], window: int) -> float:
    """``mean(losses[:window]) − mean(losses[-window:])`` (NaN when there are fewer than 2·window losses)."""
    if window < 1 or len(losses) < 2 * window:
        return math.nan
    return sum(losses[:window]) / window - sum(losses[-window:]) / window


@dataclass
class Row:
    """One line of the table."""

    preset: str
    method: str
    alignment: str
    batch: str
    fall: float | None = None
    ref_fall: float | None = None
    ratio: float | None = None
    max_grad_norm: float | None = None
    ref_max_grad_norm: float | None = None
    max_aux: float | None = None
    aux_keys: str = ""
    verdict: str = "PASS"
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict in ("PASS", "SKIP")


def judge(
    row: Row, stats: RunStats, ref: RunStats, window: int, min_ratio: float = 0.7, grad_factor: float = 100.0
) -> Row:
    """Fill ``row`` from a preset's run and its reference's and set the verdict (reasons ``; ``-joined)."""
    reasons = []
    if stats.error:
        reasons.append(f"run failed: {stats.error}")
    if ref.error:
        reasons.append(f"reference failed: {ref.error}")
    row.fall, row.ref_fall = loss_fall(stats.losses, window), loss_fall(ref.losses, window)
    if stats.losses and not all(math.isfinite(x) for x in stats.losses):
        reasons.append("non-finite loss")
    if not (math.isfinite(row.ref_fall) and row.ref_fall > 0):
        reasons.append(f"the LoRA reference's loss does not fall ({row.ref_fall:.3g}): raise --lr or --steps")
    elif math.isfinite(row.fall):
        row.ratio = row.fall / row.ref_fall
        if row.ratio < min_ratio:
            reasons.append(f"loss fall {row.ratio:.2f} x LoRA's < {min_ratio}")
    elif not stats.error:
        reasons.append(f"{len(stats.losses)} logged losses, need {2 * window}")
    aux = [x for series in stats.aux.values() for x in series]
    row.aux_keys = ",".join(sorted(stats.aux))
    if aux:
        bad = [x for x in aux if not math.isfinite(x)]
        row.max_aux = max((abs(x) for x in aux if math.isfinite(x)), default=math.nan)
        if bad:
            reasons.append(f"non-finite auxiliary loss ({row.aux_keys})")
    if stats.grad_norms:
        row.max_grad_norm = max(stats.grad_norms)
        row.ref_max_grad_norm = max(ref.grad_norms) if ref.grad_norms else None
        if not all(math.isfinite(g) for g in stats.grad_norms):
            reasons.append("non-finite gradient norm")
        elif row.ref_max_grad_norm and row.max_grad_norm > grad_factor * row.ref_max_grad_norm:
            reasons.append(
                f"gradient norm {row.max_grad_norm:.3g} > {grad_factor:g} x LoRA's {row.ref_max_grad_norm:.3g}"
            )
    row.verdict, row.reason = ("FAIL", "; ".join(reasons)) if reasons else ("PASS", "")
    row.seconds = stats.seconds
    return row


class Checker:
    """Runs presets in smoke form under ``work`` and judges them. Every run is cached by what it computes
    (:data:`RUN_KEYS` of its config): a LoRA reference, a LoraHub library, or a preset whose smoke form
    equals an earlier one's (e.g. the same method on two real datasets) is trained once."""

    def __init__(
        self,
        work: Path,
        steps: int = 30,
        lr: float = 1e-2,
        window: int | None = None,
        min_ratio: float = 0.7,
        grad_factor: float = 100.0,
        seed: int = 0,
        keep_runs: bool = False,
    ) -> None:
        self.work, self.steps, self.lr, self.seed = Path(work), int(steps), float(lr), int(seed)
        self.window = int(window) if window else max(1, self.steps // 6)
        self.min_ratio, self.grad_factor, self.keep_runs = float(min_ratio), float(grad_factor), keep_runs
        self.runs: dict[str, tuple[str, RunStats]] = {}  # config key -> (run name, stats)
        self.compositions: dict[str, tuple[str, dict | None, RunStats]] = {}  # LoraHub: key -> result
        self.work.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------ runs
    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name.replace("/", "__")

    def _train(self, cfg: DictConfig, keep: bool = False) -> RunStats:
        from mtlora.train import run

        run_dir = Path(cfg.paths.output_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        _activate(cfg)
        t0 = time.perf_counter()
        error = None
        try:
            run(cfg, run_dir)
        except Exception as e:  # a failing preset is a result, not a crash of the check
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.debug("run %s failed", run_dir, exc_info=True)
        stats = RunStats.read(run_dir)
        stats.error, stats.seconds = error, time.perf_counter() - t0
        if not (keep or self.keep_runs):
            shutil.rmtree(run_dir, ignore_errors=True)
        return stats

    def cached_run(self, cfg: DictConfig, name: str, keep: bool = False) -> tuple[str, RunStats]:
        """``(name, stats)`` of the run ``cfg`` computes: the first run with the same config, or this one
        (trained into ``cfg.paths.output_dir``)."""
        key = _key(cfg)
        if key not in self.runs:
            self.runs[key] = (name, self._train(cfg, keep))
        return self.runs[key]

    def reference_config(self, cfg: DictConfig, run_dir: Path) -> DictConfig:
        """Plain LoRA with ``cfg``'s LoRA shape and its smoke ``train``/``data``/``model``/``seed``."""
        ref = compose([*SMOKE, "adapter=lora", "alignment=none"], run_dir)
        with open_dict(ref):
            for k in SHAPE_KEYS:
                if k in cfg.adapter and k in ref.adapter:
                    ref.adapter[k] = cfg.adapter[k]
            for k in ("train", "data", "model", "seed"):
                ref[k] = cfg[k]
        return ref

    def reference(self, cfg: DictConfig) -> tuple[str, RunStats]:
        """``(name, stats)`` of ``cfg``'s LoRA reference, trained on first use."""
        name = f"ref_{sum(n.startswith('ref_') for n, _ in self.runs.values())}"
        ref = self.reference_config(cfg, self.run_dir(name))
        got = self.cached_run(ref, name)
        if got[0] == name:
            log.info("%s: %s", name, self._describe(ref))
        return got

    @staticmethod
    def _describe(cfg: DictConfig) -> str:
        a, t = cfg.adapter, cfg.train
        return (
            f"lora r={a.rank} alpha={a.alpha} rslora={a.use_rslora} dropout={a.dropout} "
            f"targets={list(a.target_modules)} mbs={t.micro_batch_size} "
            f"ga={t.gradient_accumulation_steps} batching={cfg.data.batching} sched={t.scheduler.name}"
        )

    def library(self, cfg: DictConfig) -> list[str]:
        """Run dirs of one LoRA per smoke task with ``cfg``'s LoRA shape and smoke training settings."""
        dirs = []
        for task in SMOKE_TASKS:
            n = sum(x.startswith("lib_") for x, _ in self.runs.values())
            lib = self.reference_config(cfg, self.run_dir(f"lib_{n}_{task}"))
            with open_dict(lib):
                lib.adapter.dropout = 0.0  # a LoraHub module's dropout does not exist at composition
                lib.data.select = [task]
                lib.data.rows_per_task = None
                lib.data.batching = "shuffle"
            name, stats = self.cached_run(lib, f"lib_{n}_{task}", keep=True)
            if stats.error:
                raise RuntimeError(f"LoraHub library run {name} failed: {stats.error}")
            dirs.append(str(self.run_dir(name)))
        return dirs

    # ---------------------------------------------------------------------------------------- checks
    def check(self, preset: str) -> Row:
        p = plan(preset, self.steps, self.lr, self.seed)
        batch = "-" if p.kind == "skip" else self._batch(p)
        row = Row(preset, p.method, p.alignment, batch)
        if p.kind == "skip":
            row.verdict, row.reason = "SKIP", p.note
            return row
        if p.kind == "lorahub":
            return self._check_lorahub(p, row)
        cfg = compose(p.overrides, self.run_dir(preset))
        ref_name, ref = self.reference(cfg)
        name, stats = self.cached_run(cfg, preset)  # a plain LoRA row is its own reference
        row = judge(row, stats, ref, self.window, self.min_ratio, self.grad_factor)
        notes = [row.reason, f"ref {ref_name}", "" if name == preset else f"same run as {name}"]
        row.reason = "; ".join(x for x in notes if x)
        return row

    @staticmethod
    def _batch(p: Plan) -> str:
        rows = f"{p.rows_per_task}/task x {len(SMOKE_TASKS)}" if p.rows_per_task else "shuffled"
        return f"{p.micro_batch_size} ({rows}) x GA {p.grad_accum}"

    def _check_lorahub(self, p: Plan, row: Row) -> Row:
        t0 = time.perf_counter()
        probe = compose(p.overrides, self.run_dir(p.preset))
        lib = self.library(probe)
        over = [*p.overrides, f"adapter.library=[{','.join(lib)}]", "adapter.library_glob=null"]
        cfg = compose([*over, "adapter.num_modules=null"], self.run_dir(p.preset))
        key = _key(cfg)
        if key not in self.compositions:
            stats = self._train(cfg, keep=True)
            path = Path(cfg.paths.output_dir) / "metrics" / "lorahub.json"
            res = json.loads(path.read_text()) if path.exists() else None
            if not self.keep_runs:
                shutil.rmtree(cfg.paths.output_dir, ignore_errors=True)
            self.compositions[key] = (p.preset, res, stats)
        name, res, stats = self.compositions[key]
        reasons = [f"run failed: {stats.error}"] if stats.error else []
        if res is not None:
            losses = [e["loss"] for e in res["evaluations"]] + [res["loss_at_zero"]]
            row.fall = res["ce_at_zero"] - res["ce"]  # the composition loaded (adapter.result)
            row.max_aux = max((abs(x) for x in losses if math.isfinite(x)), default=math.nan)
            row.aux_keys = "lorahub objective"
            if not all(math.isfinite(x) for x in losses):
                reasons.append("non-finite LoraHub objective")
            if not row.fall > 0:
                reasons.append(f"composition does not beat the base model (CE {res['ce_at_zero']:.4f})")
        elif not stats.error:
            reasons.append("no metrics/lorahub.json")
        row.verdict = "FAIL" if reasons else "PASS"
        notes = [*reasons, "gradient-free: composed CE < base CE"]
        notes += [] if name == p.preset else [f"same run as {name}"]
        row.reason, row.seconds = "; ".join(notes), time.perf_counter() - t0
        return row


# ---------------------------------------------------------------------------------------------- output
COLUMNS = [
    "preset", "method", "alignment", "batch", "fall", "ref_fall", "ratio", "max_grad_norm",
    "ref_max_grad_norm", "max_aux", "aux_keys", "verdict", "reason", "seconds",
]  # fmt: skip


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.3f}"
    return str(v)


def write_table(rows: list[Row], out: Path, header: str = "") -> tuple[Path, Path]:
    """``out/preset_health.md`` and ``.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    md, path_csv = out / "preset_health.md", out / "preset_health.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: asdict(r)[k] for k in COLUMNS})
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = asdict(r)
        d["seconds"] = round(d["seconds"], 1)
        lines.append("| " + " | ".join(_fmt(d[k]).replace("|", "/") for k in COLUMNS) + " |")
    n = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "FAIL", "SKIP")}
    lines += ["", f"{n['PASS']} pass, {n['FAIL']} fail, {n['SKIP']} skipped (Base rows)"]
    md.write_text("\n".join(lines) + "\n")
    return md, path_csv


@contextlib.contextmanager
def quiet_progress_bars():
    """No per-step progress bar from the training loop (which asks for one explicitly) inside the block."""
    from tqdm.auto import tqdm

    from mtlora.procedures.finetune import recipe as loop

    def quiet(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    loop.tqdm = quiet
    try:
        yield
    finally:
        loop.tqdm = tqdm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog="see the module docstring")
    p.add_argument("--presets", nargs="+", default=None, help="shell-style globs of <paper>/<table>/<cell>")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of every run (default 1e-2)")
    p.add_argument("--window", type=int, default=None, help="k logged losses averaged at each end (steps//6)")
    p.add_argument("--min-ratio", type=float, default=0.7, help="fall_preset / fall_lora needed (0.7)")
    p.add_argument("--grad-factor", type=float, default=100.0, help="grad-norm bound x LoRA's max (100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default $MTLORA_OUTPUT_DIR|outputs /preset_health")
    p.add_argument("--keep-runs", action="store_true", help="keep every run dir under <out>/runs")
    p.add_argument("--list", action="store_true", help="print the selected presets and exit")
    a = p.parse_args(argv)
    presets = list_presets(a.presets)
    if a.list or not presets:
        print("\n".join(presets) or "no preset matches")
        return 0 if presets else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("mtlora", "accelerate", "hydra", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = a.out or Path(os.environ.get("MTLORA_OUTPUT_DIR") or REPO / "outputs") / "preset_health"
    checker = Checker(out, a.steps, a.lr, a.window, a.min_ratio, a.grad_factor, a.seed, a.keep_runs)
    rows, t0 = [], time.perf_counter()
    for i, preset in enumerate(presets, 1):
        t = time.perf_counter()
        with quiet_progress_bars():
            row = checker.check(preset)
        rows.append(row)
        log.info(
            "[%d/%d] %-40s %-4s ratio %s grad %s aux %s (%.0f s) %s",
            i, len(presets), preset, row.verdict, _fmt(row.ratio), _fmt(row.max_grad_norm),
            _fmt(row.max_aux), time.perf_counter() - t, row.reason,
        )  # fmt: skip
    header = (
        f"Preset health: {a.steps} steps, lr {a.lr:g}, window {checker.window}, pass = ratio >= "
        f"{a.min_ratio:g}, finite aux losses, grad norm finite and <= {a.grad_factor:g} x LoRA's max; "
        f"{len(rows)} presets in {time.perf_counter() - t0:.0f} s"
    )
    md, path_csv = write_table(rows, out, header)
    log.info("%s\n%s\n%s", header, md, path_csv)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
