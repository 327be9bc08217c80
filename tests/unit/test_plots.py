"""What the plots show: integer ticks on integer axes, score axes from 0, legible heatmap text, legends for
"one line per layer", no empty panels, per-task loss curves; and no t-SNE of a handful of points."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import pyplot as plt

from mtlora.diagnostics import diagnostic_plots as dplots
from mtlora.diagnostics import tsne
from mtlora.run.loss_plot import plot_loss


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions close (kept open for the test)."""
    kept: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for f in kept:
        real_close(f)


def _ticks_in_view(axis) -> list[float]:
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def _integer_ticks(axis) -> bool:
    ticks = _ticks_in_view(axis)
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_loss_plot_has_per_task_curves_the_learning_rate_and_the_run_name(figures, tmp_path: Path) -> None:
    train = [
        {
            "step": s,
            "loss": 3.0 - s / 10,
            "lr": 1e-3 * (1 - s / 4),
            "task_loss": {"a": 3.1 - s / 10, "b": 2.9},
        }
        for s in (1, 2, 3)
    ]
    evals = [{"step": 3, "macro": {"loss": 2.5}, "tasks": {"a": {"loss": 2.6}, "b": {"loss": 2.4}}}]
    plot_loss(train, evals, tmp_path / "loss.png", title="tiny-lora-synthetic-s0")
    (fig,) = figures
    ax, lr_ax = fig.axes
    assert ax.get_title() == "tiny-lora-synthetic-s0"
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [
        "train (all tasks)",
        "train a",
        "train b",
        "held-out (task mean)",
        "held-out a",
        "held-out b",
    ]
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([r["lr"] for r in train])
    assert _integer_ticks(lr_ax.xaxis)  # optimizer steps


def _divergence(kl) -> dict:
    kl = np.asarray(kl, dtype=float)
    return {
        "tasks": ["a", "b"],
        "kl_matrix": kl,
        "mmd_matrix": kl / 10,
        "kl": 1.0,
        "kl_per_dim": 0.25,
        "mmd": 0.1,
    }


def test_heatmap_text_is_white_on_dark_cells_and_black_on_light_ones(figures, tmp_path: Path) -> None:
    dplots.plot_divergence(_divergence([[0.0, 4.0], [4.0, 0.0]]), tmp_path / "div.png", 3)
    ax = figures[0].axes[0]
    color = {t.get_text(): t.get_color() for t in ax.texts}
    assert color == {
        "0.00": "white",
        "4.00": "black",
    }  # viridis: dark purple at the minimum, yellow at the max
    assert dplots.text_color((0.0, 0.0, 0.0)) == "white" and dplots.text_color((1.0, 1.0, 0.0)) == "black"


def _spectra(n_layers: int, heads: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"model.layers.{i}.mlp.up_proj": {"A": rng.random(4), "B": np.sort(rng.random((heads, 4)))[:, ::-1]}
        for i in range(n_layers)
    }


def test_spectral_plot_of_plain_lora_has_no_empty_band_panel_and_names_its_layers(
    figures, tmp_path: Path
) -> None:
    res = {
        "bands": [[0, 10], [10, 50], [50, 100]],
        "alignment_pct": [None, None, None],
        "sv_importance_pct": [None, None, None],
        "quantity": "B_i",
        "edges": "ceil",
        "spectra": _spectra(3, 1),
    }
    dplots.plot_spectral(res, tmp_path / "lora.png", 6)
    (ax,) = figures[0].axes  # only the spectra
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "L0.mlp.up_proj",
        "L1.mlp.up_proj",
        "L2.mlp.up_proj",
    ]
    assert _integer_ticks(ax.xaxis) and ax.get_ylim()[0] == 0
    # multi-head: the band panel; many layers: a colour bar of the layer order instead of a long legend
    res = {
        **res,
        "alignment_pct": [50.0, 30.0, 20.0],
        "sv_importance_pct": [40.0, 40.0, 20.0],
        "spectra": _spectra(20, 4),
    }
    dplots.plot_spectral(res, tmp_path / "multi.png", 6)
    axes = figures[1].axes
    assert len(axes) == 3 and axes[1].get_legend() is None  # bands, spectra, colour bar
    assert "layer" in axes[2].get_ylabel() and axes[0].get_ylim()[0] == 0


def test_head_similarity_and_routing_have_integer_axes(figures, tmp_path: Path) -> None:
    rec = {"by_module": {"up_proj": {"layer": [0, 1], "similarity": [0.5, 0.6]}}, "mean": 0.55}
    dplots.plot_head_similarity([(2, rec), (4, rec), (6, rec)], tmp_path / "heads.png")
    layer_ax, step_ax = figures[0].axes
    assert _integer_ticks(layer_ax.xaxis) and _integer_ticks(step_ax.xaxis)
    res = {
        "middle_layer": "model.layers.0.mlp.up_proj",
        "layers": {
            "model.layers.0.mlp.up_proj": {
                "per_task": {"a": [0.7, 0.3], "b": [0.2, 0.8]},
                "entropy": 0.5,
                "cv2": 0.1,
                "cv2_per_batch": 0.2,
            }
        },
        "protocol": "tokens",
    }
    dplots.plot_routing(res, tmp_path / "routing.png", 6)
    assert list(figures[1].axes[0].get_xticks()) == [0, 1]


def test_report_score_axes_start_at_zero_and_head_counts_are_integers(
    figures, monkeypatch, tmp_path: Path
) -> None:
    from mtlora.report import metric_plots as rplots
    from mtlora.report.aggregate import Stat

    def summary(runs, metric, keys, scale, protocol):
        return [
            {
                "cell": "c",
                "model": "m",
                "adapter.num_heads": h,
                "stat": Stat(40.0 + h, 0.5, 2),
                "per_task": {},
            }
            for h in (1, 2, 3)
        ]

    monkeypatch.setattr(rplots, "build_summary", summary)
    rplots.plot_curve([], "heldin_exact_match", "adapter.num_heads", tmp_path / "heads.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] == 0 and _integer_ticks(ax.xaxis)


def test_no_tsne_of_fewer_than_30_points(caplog) -> None:
    rng = np.random.default_rng(0)
    reps = {t: {"L": torch.as_tensor(rng.normal(size=(10, 3)))} for t in range(2)}  # 20 points
    with caplog.at_level(logging.INFO, logger="mtlora.diagnostics.tsne"):
        assert tsne.representation_tsne(reps, "L", ["a", "b"]) is None
    assert "20 points (fewer than 30)" in caplog.text
    if tsne.tsne_available():
        reps = {t: {"L": torch.as_tensor(rng.normal(size=(16, 3)))} for t in range(2)}  # 32 points
        assert tsne.representation_tsne(reps, "L", ["a", "b"], perplexity=5)["xy"].shape == (32, 2)


def test_parameter_tsne_keeps_only_groups_of_30_points_or_more(caplog, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from mtlora.adapters import inject_adapters
    from mtlora.models import build_model
    from tests.helpers.compose import compose_train

    cfg = compose_train(["adapter=hydralora", "adapter.num_heads=16"], run_dir=tmp_path)
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking (non-zero, distinct) adapter weights
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    with caplog.at_level(logging.INFO, logger="mtlora.diagnostics.tsne"):
        groups = tsne.parameter_tsne(model, perplexity=5)
    sizes = {k: len(v["points"]) for k, v in tsne.parameter_points(model).items()}
    assert groups and set(groups) == set(sizes) and min(sizes.values()) >= tsne.MIN_POINTS
    assert "t-SNE of the parameter group A " in caplog.text and "(fewer than 30)" in caplog.text
    out = dplots.plot_scatter_grid(
        [(k, v["xy"], v["labels"]) for k, v in groups.items()], tmp_path / "p.png", 6
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
