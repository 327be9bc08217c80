"""Align-LoRA's alignment term in training: task-balanced batches, and a lower between-task divergence."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from mtlora.data import build_data
from mtlora.data.batching import rows_per_task
from mtlora.data.collate import collate
from mtlora.data.mixture import BatchStream
from mtlora.losses.alignment import alignment_loss
from mtlora.procedures.common import build_model_and_data
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import load_resolved_config, save_resolved_config
from mtlora.trained_run import load_run
from mtlora.training.alignment_window import AlignmentTerm
from tests.helpers.compose import compose_train
from tests.helpers.training import logged, train_tiny

# 8 rows of each of the 4 synthetic tasks per micro-batch and one micro-batch per step: with 2 rows a task's
# variance estimate is too noisy for the KL to be a usable training signal. The KL summed over task pairs
# (the paper's Eq. 5) so that 40 steps show the effect.
ALIGN = [
    "train.micro_batch_size=32",
    "train.gradient_accumulation_steps=1",
    "alignment.pair_reduce=sum",
    "alignment.pool=masked_mean",
    "train.max_steps=40",
    "eval=none",
    "logger=none",
    "train.log_every=10",
    "data.budget=null",
]


def _heldout_kl(run_dir: Path, cfg) -> float:
    """Mean-pooled A-space KL between the tasks on 16 held-out rows per task, all layers."""
    model, tok = load_run(run_dir, allow_incomplete=True)
    data = build_data(cfg.data, tok, int(cfg.model.max_seq_len))
    rows, ids = [], []
    for t, ds in enumerate(data.eval):
        rows += list(ds.select(range(16)))
        ids += [t] * 16
    batch = collate(rows, ids, data.pad_id)
    with torch.no_grad():
        model.adapter_context.begin(task_ids=batch["task_ids"], capture=True)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = alignment_loss(
            model.adapter_context.captured,
            batch["task_ids"],
            batch["attention_mask"],
            metric="kl",
            pool_mode="masked_mean",
            pair_reduce="mean",
        )
    return float(loss)


def test_kl_alignment_lowers_the_between_task_kl_in_a_space(tmp_path: Path) -> None:
    kls, losses = {}, {}
    for name in ("none", "kl"):
        d = tmp_path / name
        d.mkdir()
        cfg = compose_train(["adapter=align_kl", f"alignment={name}", *ALIGN], run_dir=d)
        save_resolved_config(cfg, d)  # what `python -m mtlora.train` writes before training
        run_training(cfg, d)
        kls[name] = _heldout_kl(d, cfg)
        recs = [json.loads(x) for x in (d / "metrics" / "train.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs]
        if name == "kl":
            align = [r["align_loss"] for r in recs]
            assert align[-1] < align[0], align  # the term it optimises goes down
    assert kls["kl"] < 0.5 * kls["none"], kls
    assert losses["kl"][-1] < losses["kl"][0]  # the LM loss still falls


def test_alignment_needs_and_gets_task_balanced_micro_batches(tmp_path: Path) -> None:
    from mtlora.config import validate_config
    from mtlora.data.batching import rows_per_task
    from mtlora.errors import ConfigError

    cfg = compose_train(["adapter=align_mmd"], run_dir=tmp_path)
    assert (cfg.alignment.name, cfg.data.batching) == ("mmd", "auto") and rows_per_task(cfg) == 2
    assert rows_per_task(compose_train([], run_dir=tmp_path)) is None  # no alignment: shuffled
    with pytest.raises(ConfigError, match="needs task-balanced"):
        validate_config(compose_train(["adapter=align_kl", "data.batching=shuffle"], run_dir=tmp_path))
    micro = ["adapter=align_kl", "alignment.window=micro", "train.micro_batch_size=4"]
    with pytest.raises(ConfigError, match="at least 2 row"):  # one micro-batch's rows: 2 per task at least
        validate_config(compose_train(micro, run_dir=tmp_path))
    # a window of whole steps may hold 1 row per task per micro-batch (the released layout) ...
    step = ["adapter=align_kl", "train.micro_batch_size=4", "train.gradient_accumulation_steps=6"]
    assert rows_per_task(compose_train(step, run_dir=tmp_path)) == 1
    validate_config(compose_train(step, run_dir=tmp_path))
    assert compose_train(["adapter=align_kl", "alignment=none"], run_dir=tmp_path).alignment.name == "none"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics" / "train.jsonl").read_text().splitlines()]


def test_alignment_is_unchanged_by_non_reentrant_gradient_checkpointing(tmp_path: Path) -> None:
    """The captured A outputs of a checkpointed forward keep their graph; recomputation does not double them."""
    runs = {}
    for gc in ("false", "true"):
        d = tmp_path / gc
        d.mkdir()
        overrides = [
            "adapter=align_kl",
            *ALIGN,
            "train.max_steps=4",
            "train.log_every=1",
            f"train.gradient_checkpointing={gc}",
        ]
        run_training(compose_train(overrides, run_dir=d), d)
        runs[gc] = _records(d)
    for key in ("loss", "align_loss"):
        assert [r[key] for r in runs["true"]] == pytest.approx([r[key] for r in runs["false"]], rel=1e-5), key
    assert all(r["align_loss"] > 0 for r in runs["true"])


def test_alignment_under_two_process_ddp(tmp_path: Path) -> None:
    from tests.helpers.compose import run_cli

    d = tmp_path / "ddp"
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "hardware=cpu_ddp2",
            "adapter=align_mmd",
            "train.micro_batch_size=16",
            "train.max_steps=3",
            "train.log_every=1",
            "eval=none",
            "logger=none",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(d)
    assert len(recs) == 3 and all(rec["align_loss"] > 0 for rec in recs)
    assert json.loads((d / "meta.json").read_text())["world_size"] == 2


STEP_WINDOW = [
    "adapter=align_kl",
    "alignment.window=micro",
    "alignment.weighting=paper",
    "train.micro_batch_size=24",
    "train.gradient_accumulation_steps=2",
    "alignment.pool=masked_mean",
    "train.max_steps=4",
    "train.log_every=1",
    "eval=none",
    "logger=none",
    "data.budget=512",
]


def test_step_window_one_backward_trains_like_per_micro_batch_backwards(tmp_path: Path) -> None:
    """With λ=0 the step window's single backward over both micro-batches gives the same updates (same
    losses) as one backward per micro-batch; with λ>0 it logs the wider-window loss (12+12 rows per task)
    and trains."""
    runs = {}
    for name, extra in {
        "micro0": ["alignment.weight=0.0"],
        "step0": ["alignment.weight=0.0", "alignment.window=step"],
        "step": ["alignment.window=step"],
        "micro": [],
    }.items():
        d = tmp_path / name
        d.mkdir()
        run_training(compose_train([*STEP_WINDOW, *extra], run_dir=d), d)
        runs[name] = _records(d)
    assert [r["loss"] for r in runs["step0"]] == pytest.approx([r["loss"] for r in runs["micro0"]], rel=1e-6)
    assert all(r["align_loss"] > 0 for r in runs["step"])
    # same first parameters: the step-window statistic (24+24 rows) differs from the mean of two 24-row ones
    assert runs["step"][0]["align_loss"] != pytest.approx(runs["micro"][0]["align_loss"], rel=1e-3)
    assert runs["step"][-1]["loss"] != pytest.approx(runs["micro0"][-1]["loss"], rel=1e-6)


def test_gathered_statistics_under_ddp_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """2 processes x 16 rows with alignment.gather=true compute the alignment loss of all 32 rows, like one
    process with 32 rows: the same training and alignment losses at every step."""
    from tests.helpers.compose import run_cli

    common = [
        "adapter=align_kl",
        "adapter.dropout=0.0",
        "alignment.pool=masked_mean",
        "train.gradient_accumulation_steps=1",
        "train.max_steps=3",
        "train.log_every=1",
        "eval=none",
        "logger=none",
        "data.budget=512",
    ]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    r = run_cli(
        [
            f"hydra.run.dir={ddp}",
            "hardware=cpu_ddp2",
            "train.micro_batch_size=16",
            "alignment.gather=true",
            *common,
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([f"hydra.run.dir={single}", "train.micro_batch_size=32", *common], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _records(ddp), _records(single)
    assert len(a) == len(b) == 3
    for key in ("loss", "align_loss"):
        assert [x[key] for x in a] == pytest.approx([x[key] for x in b], rel=1e-4), key


# ---------------------------------------------------------------- every adapter with a shared down-projection


def _step_micro_batches(cfg, data, rank: int = 0, world: int = 1) -> list[dict]:
    """The micro-batches of the first optimizer step of process ``rank`` of ``world``, as the loop draws them
    (rows padded to ``alignment.pad_to``)."""
    stream = BatchStream(data.schedule, int(cfg.train.micro_batch_size), rank, world, rows_per_task(cfg))
    it = stream.iterate()
    pad_to = cfg.alignment.get("pad_to")
    return [data.batch(next(it)[2], pad_to) for _ in range(int(cfg.train.gradient_accumulation_steps))]


def _initial_model(cfg):
    """The adapter-injected model at the run's initial parameters (same seed, same order as the loop)."""
    torch.manual_seed(int(cfg.seed))
    _, model, data = build_model_and_data(cfg)
    model.train()
    return model, data


def _captured(model, b: dict) -> dict:
    model.adapter_context.begin(task_ids=b["task_ids"], capture=True)
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return model.adapter_context.captured


SHARED_A = ["hydralora", "rlora", "mlora", "mtl_lora", "moelora", "dora"]
ANY_ADAPTER = [  # 6 rows per task per step: the KL's floor
    "train.micro_batch_size=24",
    "train.gradient_accumulation_steps=1",
    "train.max_steps=3",
    "train.log_every=1",
    "eval=none",
    "logger=none",
    "data.budget=256",
]


@pytest.mark.parametrize(
    ("adapter", "metric"), [*((a, "kl") for a in SHARED_A), ("rlora", "mmd"), ("mtl_lora", "mmd")]
)
def test_alignment_trains_every_adapter_with_a_shared_down_projection(
    tmp_path: Path, adapter: str, metric: str
) -> None:
    """A few steps with the alignment term: logged, finite and > 0 at every step; the term alone sends a
    gradient to the down-projection A of every adapted layer."""
    over = [f"adapter={adapter}", f"alignment={metric}", *ANY_ADAPTER]
    d = train_tiny(tmp_path, "run", over)
    align = logged(d, "align_loss")
    assert len(align) == 3 and all(math.isfinite(a) and a > 0 for a in align), align
    assert all(math.isfinite(x) for x in logged(d)), logged(d)

    cfg = compose_train(over, run_dir=d)
    model, data = _initial_model(cfg)
    b = _step_micro_batches(cfg, data)[0]
    captured = _captured(model, b)
    loss = AlignmentTerm.from_config(cfg.alignment)(captured, b["task_ids"], b["attention_mask"])
    assert loss is not None and math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    a_grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_A")}
    assert len(a_grads) == len(captured) > 0, (sorted(a_grads), sorted(captured))
    for n, g in a_grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n


def test_kl_alignment_lowers_the_a_space_kl_of_hydralora(tmp_path: Path) -> None:
    """Same seed and rows, HydraLoRA with alignment=none vs kl: the held-out between-task KL of the shared A's
    outputs ends much lower with the alignment term."""
    kls = {}
    for name in ("none", "kl"):
        d = tmp_path / name
        d.mkdir()
        cfg = compose_train(
            ["adapter=hydralora", f"alignment={name}", *ALIGN, "train.max_steps=10"], run_dir=d
        )
        save_resolved_config(cfg, d)
        run_training(cfg, d)
        kls[name] = _heldout_kl(d, cfg)
    assert kls["kl"] < 0.2 * kls["none"], kls  # measured: 54 -> 1.4 after 10 steps


# ---------------------------------------------------------------- per-rank statistics under DDP


@pytest.mark.parametrize("window", ["micro", "step"])
def test_per_rank_alignment_under_ddp_is_the_mean_of_each_ranks_own_term(tmp_path: Path, window: str) -> None:
    """gather=false: each process computes the term from its own rows only. The align_loss logged for the first
    step equals the mean over both ranks (and, window=micro, over the 2 micro-batches) of the term recomputed
    here from that rank's rows at the initial parameters; it is not the statistic of the global batch.
    window=micro runs the paper's per-position statistics (pool=none), window=step pools the step's rows."""
    from tests.helpers.compose import run_cli

    d = tmp_path / window
    # micro: per position over each micro-batch's own padded length (with dropout 0 the rows' shared prompt
    # prefix leaves zero-variance positions whose ε-sized variances dominate a 96-position layout)
    extra = ["alignment.pool=masked_mean"] if window == "step" else ["alignment.pad_to=null"]
    r = run_cli(
        [
            f"hydra.run.dir={d}",
            "hardware=cpu_ddp2",
            "adapter=align_kl",
            "adapter.dropout=0.0",  # train-mode dropout would draw from each rank's RNG stream
            f"alignment.window={window}",
            "train.micro_batch_size=24",
            "train.gradient_accumulation_steps=2",
            "train.max_steps=1",
            "train.log_every=1",
            "eval=none",
            "logger=none",
            "data.budget=512",
            *extra,
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = _records(d)

    cfg = load_resolved_config(d)
    assert (cfg.alignment.gather, cfg.alignment.window) == (False, window)
    model, data = _initial_model(cfg)
    term = AlignmentTerm.from_config(cfg.alignment)
    per_rank, pooled, ids = [], [], []
    with torch.no_grad():
        for rank in (0, 1):
            batches = _step_micro_batches(cfg, data, rank, 2)
            if window == "micro":
                terms = [
                    float(term(_captured(model, b), b["task_ids"], b["attention_mask"])) for b in batches
                ]
                per_rank.append(statistics.mean(terms))
            else:
                parts = [term.pooled(_captured(model, b), b["attention_mask"]) for b in batches]
                per_rank.append(float(term.from_pooled(parts, [b["task_ids"] for b in batches])))
                pooled += parts
                ids += [b["task_ids"] for b in batches]
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-2)  # the ranks saw different rows
    assert rec["align_loss"] == pytest.approx(statistics.mean(per_rank), rel=1e-4), per_rank
    if window == "step":  # the global batch's statistic (what gather=true computes) is another number
        assert rec["align_loss"] != pytest.approx(float(term.from_pooled(pooled, ids)), rel=1e-2)
