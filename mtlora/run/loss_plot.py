"""Plots written into ``<run_dir>/plots/``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _task_colors(tasks: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}


def plot_loss(train: list[dict], evals: list[dict], out: Path, title: str | None = None) -> Path:
    """Training loss per logged step (all tasks, and each task's), held-out loss where it was measured (task
    mean and per task, dashed), and the learning rate below; ``title``: the run name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = sorted(
        {t for r in train for t in r.get("task_loss") or {}} | {t for r in evals for t in r.get("tasks", {})}
    )
    color = _task_colors(tasks)
    fig, (ax, lr_ax) = plt.subplots(
        2, 1, figsize=(8.0, 5.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            color="k",
            lw=1.6,
            label="train (all tasks)",
        )
    for t in tasks:
        pts = [(r["step"], r["task_loss"][t]) for r in train if t in (r.get("task_loss") or {})]
        if pts:
            ax.plot(*zip(*pts), color=color[t], lw=0.9, alpha=0.85, label=f"train {t}")
    pts = [(r["step"], r["macro"]["loss"]) for r in evals if "macro" in r]
    if pts:
        ax.plot(*zip(*pts), "o--", color="k", ms=4, lw=1.2, label="held-out (task mean)")
    for t in tasks:
        pts = [(r["step"], r["tasks"][t]["loss"]) for r in evals if t in r.get("tasks", {})]
        if pts:
            ax.plot(*zip(*pts), "s--", color=color[t], ms=3, lw=0.9, label=f"held-out {t}")
    ax.set_ylabel("cross-entropy per answer token")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title, fontsize=10)
    lr = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    if lr:
        lr_ax.plot(*zip(*lr), color="tab:gray", lw=1.2)
    lr_ax.set_ylabel("learning rate", fontsize=8)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.set_ylim(bottom=0)
    lr_ax.grid(alpha=0.3)
    lr_ax.set_xlabel("optimizer step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
