"""Diagnostics during training (same losses, scheduled records) and ``python -m mtlora.diagnose`` on a saved run."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from mtlora.diagnose import diagnose, with_defaults
from mtlora.diagnostics import DiagnosticsRunner
from mtlora.diagnostics.heads import INIT_FILE, load_initial_heads
from mtlora.train import run
from mtlora.trained_run import load_run
from tests.helpers.compose import REPO, compose_train, run_module
from tests.helpers.training import SHORT_RUN, logged, train_tiny
from tests.helpers.wandb_files import offline_runs as _offline_runs

HYDRA = [*SHORT_RUN, "adapter=hydralora"]  # dropout 0.05: a consumed RNG draw would change the losses
ALL = {"heads", "conflict", "spectral", "routing", "divergence"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same six-step HydraLoRA run without diagnostics and with ``diagnostics=default`` every 2 steps
    (the latter through ``mtlora.train.run``: a complete run dir that ``load_run`` accepts)."""
    tmp = tmp_path_factory.mktemp("diag")
    plain = train_tiny(tmp, "none", HYDRA)
    d = tmp / "default"
    run(compose_train([*HYDRA, "diagnostics=default", "diagnostics.every_steps=2"], run_dir=d), d)
    return {"none": plain, "default": d}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics" / "diagnostics.jsonl").read_text().splitlines()]


def _is_png(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_do_not_change_the_training_losses(runs) -> None:
    assert not (runs["none"] / "metrics" / "diagnostics.jsonl").exists()
    assert logged(runs["default"]) == logged(runs["none"])  # exactly: same RNG stream, same train mode
    assert logged(runs["default"], "task_loss") == logged(runs["none"], "task_loss")


def test_records_are_written_at_the_scheduled_steps(runs) -> None:
    by_step: dict[int, set[str]] = defaultdict(set)
    for r in _records(runs["default"]):
        assert r["source"] == "train" and r["seconds"] >= 0
        by_step[r["step"]].add(r["diagnostic"])
        assert r["event"] == {0: "init", 6: "end"}.get(r["step"], "step")
    assert dict(by_step) == {0: ALL, 2: {"heads", "routing"}, 4: {"heads", "routing"}, 6: ALL}
    recs = {(r["step"], r["diagnostic"]): r for r in _records(runs["default"])}
    assert recs[(0, "heads")]["mean"] is None  # HydraLoRA's B heads start at zero: no cosine
    heads = recs[(6, "heads")]
    assert 0 < heads["mean"] <= 1 and heads["quantity"] == "B_i"
    assert heads["init"] == "saved" and heads["mean_increment"] == heads["mean"]  # zero init: B − B₀ = B
    assert (runs["default"] / INIT_FILE).is_file()
    conflict = recs[(6, "conflict")]
    assert len(conflict["matrix"]) == 4 and conflict["tasks"][0] == "arithmetic"
    assert sorted(conflict["per_layer"]) == ["0", "1"] and len(conflict["per_module"]) > 2
    assert set(conflict["noise_floor"]["per_task"]) == set(conflict["tasks"])
    assert isinstance(conflict["noise_floor"]["above_cross"], bool) and conflict["noise_floor"]["note"]
    assert conflict["rows_per_task"] == {t: 128 for t in conflict["tasks"]}  # default: 8 batches x 16 rows
    assert 0 < recs[(6, "routing")]["entropy"] <= 1.3863  # ≤ log(4 heads)
    assert recs[(6, "routing")]["cv2_per_batch"] >= 0 and recs[(6, "routing")]["protocol"] == "tokens"
    assert recs[(6, "divergence")]["kl"] > 0 and recs[(6, "divergence")]["mmd"] > 0
    assert (
        len(recs[(6, "spectral")]["alignment_pct"]) == 3
        and len(recs[(6, "spectral")]["sv_importance_pct"]) == 3
    )
    plots = runs["default"] / "plots" / "diagnostics"
    assert not list(plots.glob("*_init_step0.png"))  # default plot_at: [end] (the end plots show the history)
    for name in (
        "conflict_end_step6.png",
        "head_similarity.png",
        "routing_end_step6.png",
        "spectral_end_step6.png",
    ):
        assert _is_png(plots / name), name


def test_a_diagnostics_run_leaves_rng_and_mode_untouched(runs, tmp_path) -> None:
    model, _ = load_run(runs["default"])
    model.train()
    from mtlora.data import build_data
    from mtlora.models import build_tokenizer

    cfg = OmegaConf.load(runs["default"] / "config_resolved.yaml")
    data = build_data(cfg.data, build_tokenizer(cfg.model), int(cfg.model.max_seq_len))
    dcfg = compose_train(["diagnostics=default", "diagnostics.plots=false"]).diagnostics
    state = torch.get_rng_state()
    recs = DiagnosticsRunner(dcfg, model, data, tmp_path, seed=0).run(6, "end")
    assert {r["diagnostic"] for r in recs} == ALL
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert all(p.grad is None for p in model.parameters())


def test_with_defaults_adds_the_no_output_overrides() -> None:
    argv = with_defaults(["diagnose", "run_dir=R", "diagnostics.which=[conflict]"])
    assert "+run_dir=R" in argv and "hydra.output_subdir=null" in argv and "hydra.run.dir=." in argv
    assert "diagnostics=default" in argv
    assert "diagnostics=default" not in with_defaults(["diagnose", "run_dir=R", "diagnostics=full"])


def test_diagnose_cli_writes_every_diagnostic_and_the_plots(runs, tmp_path) -> None:
    d = runs["default"]
    before = len(_records(d))
    small = [
        "diagnostics.conflict.batches_per_task=1",
        "diagnostics.divergence.max_examples_per_task=16",
        "diagnostics.routing.max_examples_per_task=8",
        "diagnostics.tsne.perplexity=5",
    ]
    res = run_module(
        "mtlora.diagnose",
        [f"run_dir={d}", "diagnostics=full", *small],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    new = _records(d)[before:]
    assert {r["diagnostic"] for r in new} == ALL | {"tsne"}
    assert all(r["source"] == "diagnose" and r["event"] == "diagnose" and r["step"] == 6 for r in new)
    tsne = next(r for r in new if r["diagnostic"] == "tsne")
    # 64 held-out representations are embedded; the tiny model's parameter groups (4 to 16 matrices each) are
    # fewer than 30 points: no t-SNE of them, and no parameter plot
    assert len(tsne["representations"]["xy"]) == 4 * 16 and tsne["parameters"] == {}
    assert re.search(r"parameter group B \w+ skipped: \d+ points \(fewer than 30\)", res.stderr)
    conflict = next(r for r in new if r["diagnostic"] == "conflict")
    assert conflict["batches_per_task"] == {t: 1 for t in conflict["tasks"]}
    plots = d / "plots" / "diagnostics"
    for kind in ("conflict", "routing", "spectral", "divergence", "tsne_representations"):
        assert _is_png(plots / f"{kind}_diagnose_step6.png"), kind
    assert not (plots / "tsne_parameters_diagnose_step6.png").exists()
    assert _is_png(plots / "head_similarity_diagnose.png")
    assert list(tmp_path.iterdir()) == []  # no Hydra output dir, .hydra/ or log file in the cwd
    assert not (d / ".hydra").exists() and not list(d.glob("*.log"))


def test_compare_cli_compares_runs_layer_by_layer(runs, tmp_path) -> None:
    d = runs["default"]
    res = run_module(
        "mtlora.diagnostics.compare",
        [str(d), str(d), "--labels", "a", "b", "--out", str(tmp_path / "cmp")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["heads"]["quantity"] == "B_i" and set(cmp["heads"]["runs"]) == {"a", "b"}
    assert cmp["conflict"]["layers"] == ["0", "1"] and cmp["conflict"]["per_layer"]["b"]["0"]["delta"] == 0.0
    assert cmp["conflict"]["runs"]["b"]["cosine_drop_pct"] in (0.0, None)
    assert "kl_per_dim" in cmp["divergence"]["note"]
    for name in ("compare_heads.png", "compare_conflict.png"):
        assert _is_png(tmp_path / "cmp" / name), name


def test_random_init_heads_are_saved_before_training_and_diagnose_reports_the_increments(tmp_path) -> None:
    """R-LoRA: the training loop writes the initial heads B₀ (with diagnostics off), and diagnose on the
    finished run dir reports the similarity of B − B₀ beside the raw one."""
    from mtlora.procedures.common import build_model_and_data

    d = tmp_path / "rlora"
    over = [
        "adapter=rlora",
        "train.max_steps=3",
        "eval=none",
        "data.budget=64",
        "debug=smoke",
        "train.optimizer.lr=0.01",
    ]
    run(compose_train(over, run_dir=d), d)
    init = load_initial_heads(d)
    cfg = compose_train(over)
    torch.manual_seed(int(cfg.seed))
    _, fresh, _ = build_model_and_data(cfg)
    name, f0 = next(iter(init.items()))
    assert torch.equal(f0.up.float(), fresh.get_submodule(name).lora_B.detach())
    trained, _ = load_run(d)
    assert not torch.equal(f0.up.float(), trained.get_submodule(name).lora_B.detach())  # it trained
    dcfg = compose_train(
        ["diagnostics=default", "diagnostics.which=[heads]", "diagnostics.plots=false"]
    ).diagnostics
    (rec,) = diagnose(d, dcfg, logger=OmegaConf.create({"name": "none"}))
    assert rec["init"] == "saved" and rec["quantity"] == "B_i"
    assert rec["mean_increment"] is not None and rec["mean_increment"] != pytest.approx(rec["mean"], abs=1e-3)


def test_diagnose_logs_to_wandb_offline(runs, tmp_path) -> None:
    """A run trained with logger=wandb_offline: ``mtlora.diagnose`` logs the diag/ scalars to a new offline
    wandb run (job_type diagnose, the run's group), the training run's own wandb id untouched. A run trained
    with logger=csv: logger=wandb_offline on the command line does the same; logger=none logs nothing."""
    from mtlora.diagnose import diagnose

    env = {"WANDB_MODE": "offline", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cheap = ["diagnostics.which=[heads,routing,divergence]", "diagnostics.plots=false"]
    w = tmp_path / "wandb_run"
    train = ["adapter=hydralora", "train.max_steps=6", "eval=none", "data.budget=128", "logger=wandb_offline"]
    res = run_module("mtlora.train", [f"hydra.run.dir={w}", *train], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    csv = tmp_path / "csv_run"  # a copy: the module's run dir stays as the other tests expect it
    shutil.copytree(runs["default"], csv)
    for d, extra in ((w, []), (csv, ["logger=wandb_offline"])):
        train_id = (d / "wandb_id.txt").read_text().strip() if (d / "wandb_id.txt").exists() else None
        before = set(_offline_runs(d)) if (d / "wandb").exists() else set()
        res = run_module(
            "mtlora.diagnose", [f"run_dir={d}", *cheap, *extra], cwd=tmp_path, env=env, timeout=300
        )
        assert res.returncode == 0, res.stderr[-3000:]
        new = {k: v for k, v in _offline_runs(d).items() if k not in before}
        assert len(new) == 1, new
        ((run_id, info),) = new.items()
        assert run_id != train_id and info["job_type"] == "diagnose" and info["group"] == "train"
        assert (train_id is None) == (not (d / "wandb_id.txt").exists())  # no id file written for diagnose
        recs = {r["diagnostic"]: r for r in _records(d) if r["source"] == "diagnose"}
        assert info["history"]["_step"] == recs["heads"]["step"] == 6
        for name, stat in (
            ("heads", "mean"),
            ("routing", "entropy"),
            ("divergence", "kl"),
            ("divergence", "mmd"),
        ):
            assert info["history"][f"diag/{name}/{stat}"] == pytest.approx(recs[name][stat]), (name, stat)
    # logger=none (command line) on the wandb run: nothing new under wandb/; the dataset bars are off
    n = len(_offline_runs(w))
    datasets.enable_progress_bars()
    diagnose(
        w,
        compose_train(["diagnostics=default", *cheap]).diagnostics,
        logger=OmegaConf.create({"name": "none"}),
    )
    assert len(_offline_runs(w)) == n
    assert not datasets.is_progress_bar_enabled()
