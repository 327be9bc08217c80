"""scripts/preset_health.py without training: the smoke form keeps each preset's batch structure and method,
the LoRA reference copies the preset's shape and settings, and the verdict rules (loss-fall ratio, finite
auxiliary losses, bounded gradient norm) on hand-made logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from mtlora.data.batching import rows_per_task
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def health():
    return load_script("preset_health")


def _stats(health, losses, grads=None, aux=None, error=None):
    return health.RunStats(losses=list(losses), grad_norms=list(grads or [1.0] * len(losses)), aux=aux or {},
                           error=error)  # fmt: skip


def _row(health):
    return health.Row("p/t/c", "lora", "none", "-")


def test_presets_are_the_paper_tables_cells(health) -> None:
    names = health.list_presets()
    assert "align_lora/t4/a_lora_k" in names and "hydralora/t3/lorahub" in names
    assert all(n.count("/") == 2 and not n.startswith("sweeps/") for n in names)
    assert health.list_presets(["align_lora/t4/a_lora_*", "rlora/t3/rlora"]) == [
        "align_lora/t4/a_lora_k", "align_lora/t4/a_lora_m", "rlora/t3/rlora",
    ]  # fmt: skip


def test_loss_fall_is_the_difference_of_the_end_means(health) -> None:
    assert health.loss_fall([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], 2) == pytest.approx(5.5 - 1.5)
    assert math.isnan(health.loss_fall([6.0, 5.0, 4.0], 2))  # fewer than 2 windows


def test_task_balanced_preset_keeps_rows_per_task_and_accumulation(health, tmp_path: Path) -> None:
    """A-LoRA-K (Align-LoRA Table 5: 8 = 1 row x 8 tasks, GA 10) keeps 1 row of each task and GA 10 over
    the 5 synthetic tasks; its adapter and KL alignment stay; lr, steps, seed and budget are the check's."""
    p = health.plan("align_lora/t5/a_lora_k")
    assert (p.kind, p.method, p.alignment, p.rows_per_task) == ("train", "lora", "kl", 1)
    assert (p.micro_batch_size, p.grad_accum) == (5, 10)
    cfg = health.compose(p.overrides, tmp_path)
    assert cfg.model.name == "tiny" and list(cfg.data.tasks) == list(health.SMOKE_TASKS)
    assert {t.source.num_examples for t in cfg.data.tasks.values()} == {400}
    assert rows_per_task(cfg) == 1 and cfg.train.gradient_accumulation_steps == 10
    assert cfg.alignment.name == "kl" and cfg.alignment.weight == 0.2 and cfg.adapter.method == "lora"
    assert cfg.train.optimizer.lr == 1e-2 and cfg.train.max_steps == 30 and cfg.seed == 0
    assert cfg.train.scheduler.name == "linear" and cfg.train.warmup_ratio == 0.0  # the preset's schedule
    assert cfg.data.budget == 30 * 5 * 10 and cfg.train.precision == "fp32"
    assert cfg.train.log_every == 1 and not cfg.train.loss_watchdog.enabled and not cfg.eval.suites


def test_shuffled_preset_keeps_its_micro_batch(health, tmp_path: Path) -> None:
    p = health.plan("rlora/t3/rlora")
    assert (p.rows_per_task, p.micro_batch_size, p.grad_accum) == (None, 6, 16)
    cfg = health.compose(p.overrides, tmp_path)
    assert rows_per_task(cfg) is None and cfg.train.micro_batch_size == 6
    assert cfg.adapter.method == "rlora" and cfg.train.scheduler.name == "cosine"


def test_spectral_regulariser_fires_within_the_smoke_run(health, tmp_path: Path) -> None:
    p = health.plan("mtlora/main/mtlora_bbh", steps=30)
    cfg = health.compose(p.overrides, tmp_path)
    assert cfg.adapter.spectral.every_steps == 10 and cfg.adapter.spectral["lambda"] == 1.0
    assert "adapter.spectral.every_steps=10" not in health.plan("mtlora/main/hydralora_bbh").overrides


def test_base_rows_are_skipped(health) -> None:
    p = health.plan("hydralora/t3/base")
    assert p.kind == "skip" and not p.overrides
    assert health.plan("hydralora/t3/lorahub").kind == "lorahub"


def test_reference_is_plain_lora_with_the_presets_shape_and_settings(health, tmp_path: Path) -> None:
    cfg = health.compose(health.plan("align_lora/t2/rlora").overrides, tmp_path / "p")
    ref = health.Checker(tmp_path).reference_config(cfg, tmp_path / "r")
    assert ref.adapter.method == "lora" and ref.alignment.name == "none"
    for k in ("rank", "alpha", "dropout", "use_rslora"):
        assert ref.adapter[k] == cfg.adapter[k], k
    assert list(ref.adapter.target_modules) == list(cfg.adapter.target_modules)
    assert ref.train == cfg.train and ref.data == cfg.data and ref.model == cfg.model and ref.seed == cfg.seed


def test_healthy_run_passes(health) -> None:
    ref = _stats(health, [6, 6, 5, 4, 3, 3], grads=[1, 2, 1, 1, 1, 1])
    run = _stats(health, [6, 6, 5.5, 4.5, 3.8, 3.6], grads=[3, 5, 2, 2, 2, 2], aux={"aux_loss": [0.1] * 6})
    row = health.judge(_row(health), run, ref, window=2)
    assert row.verdict == "PASS", row.reason
    assert row.ratio == pytest.approx((6 - 3.7) / 3) and row.max_grad_norm == 5 and row.max_aux == 0.1


@pytest.mark.parametrize(
    ("losses", "grads", "aux", "error", "reason"),
    [
        ([6, 6, 5.5, 5.5, 4.5, 4.5], None, None, None, "loss fall 0.50 x LoRA's < 0.7"),
        ([6, 6, 5, 4, 3, 3], None, {"align_loss": [1.0, math.nan]}, None, "non-finite auxiliary loss"),
        ([6, 6, 5, 4, 3, 3], [1, 1, 201, 1, 1, 1], None, None, "gradient norm 201 > 100 x LoRA's 2"),
        ([6, 6, 5, 4, 3, 3], [1, 1, math.inf, 1, 1, 1], None, None, "non-finite gradient norm"),
        ([6, 6, 5, 4, math.nan, math.nan], None, None, None, "non-finite loss"),
        ([6, 6], None, None, "ConfigError: bad", "run failed: ConfigError: bad"),
    ],
    ids=["slow-fall", "nan-aux", "grad-blowup", "inf-grad", "nan-loss", "error"],
)
def test_unhealthy_run_fails(health, losses, grads, aux, error, reason) -> None:
    ref = _stats(health, [6, 6, 5, 4, 3, 3], grads=[1, 2, 1, 1, 1, 1])
    row = health.judge(_row(health), _stats(health, losses, grads, aux, error), ref, window=2)
    assert row.verdict == "FAIL" and reason in row.reason, row.reason


def test_a_reference_that_does_not_learn_cannot_pass_anything(health) -> None:
    flat = _stats(health, [6, 6, 6, 6])
    row = health.judge(_row(health), _stats(health, [6, 5, 4, 3]), flat, window=2)
    assert row.verdict == "FAIL" and "reference's loss does not fall" in row.reason


def test_table_files(health, tmp_path: Path) -> None:
    ok = health.judge(_row(health), _stats(health, [6, 5, 4, 3]), _stats(health, [6, 5, 4, 3]), window=2)
    skip = health.Row("p/t/base", "none", "none", "-", verdict="SKIP", reason="Base row")
    md, path_csv = health.write_table([ok, skip], tmp_path, header="h")
    rows = list(csv.DictReader(path_csv.open()))
    assert [r["verdict"] for r in rows] == ["PASS", "SKIP"] and float(rows[0]["ratio"]) == 1.0
    text = md.read_text()
    assert text.startswith("h\n") and "| p/t/c | lora |" in text and "1 pass, 0 fail, 1 skipped" in text
