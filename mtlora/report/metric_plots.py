"""Report plots from finished runs: metric vs a config value (rank, alignment λ, head-count sweeps) and
per-task bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mtlora.report.aggregate import build_summary  # noqa: E402
from mtlora.report.run_dirs import Run  # noqa: E402

# --plot name -> (config path on the x axis, axis label, log base of the x axis or None for linear)
CURVES = {
    "rank": ("adapter.rank", "adapter rank r", 2),
    "lambda": ("alignment.weight", "alignment weight λ", 10),
    "heads": ("adapter.num_heads", "number of heads N", None),
}


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def plot_curve(
    runs: Sequence[Run],
    metric: str,
    x_path: str,
    out: Path,
    xlabel: str | None = None,
    scale: float = 100.0,
    bbh_protocol: str | None = None,
    log_base: float | None = None,
) -> Path | None:
    """One line per (cell, model): mean over seeds of ``metric`` vs the config value at ``x_path``, with
    ± std error bars; ``log_base``: a log x axis of that base (None: linear). None (nothing written) when
    no finished run has both."""
    groups: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for g in build_summary(runs, metric, [x_path], scale, bbh_protocol):
        if _is_num(g[x_path]):
            s = g["stat"]
            groups.setdefault((g["cell"], g["model"]), []).append((float(g[x_path]), s.mean, s.std or 0.0))
    if not groups:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for (cell, model), pts in sorted(groups.items()):
        pts.sort()
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=1.4, label=f"{cell} ({model})")
    if log_base is not None:
        ax.set_xscale("log", base=float(log_base))
        xs_all = sorted({x for pts in groups.values() for x, _, _ in pts})
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.minorticks_off()
    elif all(float(x).is_integer() for pts in groups.values() for x, _, _ in pts):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks, head counts
    ax.set_xlabel(xlabel or x_path)
    ax.set_ylabel(f"{metric} × {scale:g}")
    ax.set_ylim(bottom=0)  # scores and losses are >= 0: no axis that starts near the data's minimum
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_per_task(
    runs: Sequence[Run], metric: str, out: Path, scale: float = 100.0, bbh_protocol: str | None = None
) -> Path | None:
    """Grouped bars: per task, one bar per (cell, model) = mean over seeds (± std)."""
    summary = [g for g in build_summary(runs, metric, (), scale, bbh_protocol) if g["per_task"]]
    if not summary:
        return None
    tasks = sorted({t for g in summary for t in g["per_task"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(tasks) * max(1, len(summary) / 2)), 4.2), dpi=110)
    for i, g in enumerate(summary):
        xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(tasks))]
        stats = [g["per_task"].get(t) for t in tasks]
        ax.bar(
            xs,
            [s.mean if s else 0.0 for s in stats],
            width,
            yerr=[(s.std or 0.0) if s else 0.0 for s in stats],
            capsize=2,
            label=f"{g['cell']} ({g['model']})",
        )
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} × {scale:g} (per task)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
