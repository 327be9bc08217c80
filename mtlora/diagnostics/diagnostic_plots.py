"""Plots of the diagnostics, written under ``<run_dir>/plots/diagnostics/`` (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

#: cells darker than this relative luminance get white text
DARK = 0.45
#: "one line per layer" plots name each line in a legend up to this many lines, else a colour bar of the layer order
MAX_LEGEND_LINES = 12


def luminance(rgba) -> float:
    """Relative luminance ``0.2126 R + 0.7152 G + 0.0722 B`` of an RGB(A) colour in [0, 1] (sRGB, linearised)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_color(rgba) -> str:
    """White on a dark cell, black on a light one."""
    return "white" if luminance(rgba) < DARK else "black"


def integer_axis(axis) -> None:
    """Ticks only at integers (layer, step, SV index, expert axes)."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _layer_lines(ax, curves: list[tuple[str, np.ndarray]], **kw) -> None:
    """One line per layer: named in a legend when there are few, else coloured by layer order with a colour bar."""
    few = len(curves) <= MAX_LEGEND_LINES
    cmap = plt.get_cmap("tab10" if few and len(curves) <= 10 else "viridis")
    for i, (name, y) in enumerate(curves):
        color = cmap(i) if few and len(curves) <= 10 else cmap(i / max(len(curves) - 1, 1))
        ax.plot(y, color=color, label=name, **kw)
    if few:
        ax.legend(fontsize=6, ncol=1 + len(curves) // 7)
    elif curves:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(curves) - 1))
        ax.figure.colorbar(sm, ax=ax, fraction=0.046, label="adapter layer (model order)")


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _heatmap(ax, m, labels, title, vmin=None, vmax=None, cmap="coolwarm") -> None:
    m = np.asarray(m, dtype=float)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(m) <= 10:
        for i in range(len(m)):
            for j in range(len(m)):
                finite = np.isfinite(m[i, j])
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}" if finite else "—",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=text_color(im.cmap(im.norm(m[i, j]))) if finite else "black",
                )
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def _layer_label(key) -> str:
    return f"layer {key}" if str(key).isdigit() else str(key)


def layer_order(keys) -> list:
    """Per-layer keys (layer indices, as ints or JSON strings, and "other") in layer order."""
    return sorted(keys, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))


def plot_conflict(res: dict, out: Path, step: int) -> Path:
    """Global T×T gradient-cosine heatmap and the mean pairwise cosine of every transformer layer (with
    the same-task noise floor)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    m = np.array(res["matrix"], dtype=float)
    floor = res["noise_floor"]["mean"]
    _heatmap(
        a,
        m,
        res["tasks"],
        f"gradient cosine, step {step} (mean {res['mean_cosine']:.3f}, "
        f"{res['conflict_ratio']:.0%} pairs < 0"
        + ("" if floor is None else f", same-task floor {floor:.2f}")
        + ")",
        -1,
        1,
    )
    keys = layer_order(res["per_layer"])
    layers = [res["per_layer"][k] for k in keys]
    vals = [np.nan if v["mean_cosine"] is None else v["mean_cosine"] for v in layers]
    y = np.arange(len(keys))
    b.barh(y, vals, color=["tab:red" if v < 0 else "tab:blue" for v in np.nan_to_num(vals)], label="tasks")
    fl = [np.nan if v.get("noise_floor") is None else v["noise_floor"] for v in layers]
    b.plot(fl, y, "k|", ms=10, mew=2, label="same-task floor")
    b.set_yticks(y, [_layer_label(k) for k in keys], fontsize=6)
    b.axvline(0, color="k", lw=0.8)
    b.set_xlabel("mean pairwise gradient cosine (higher = tasks agree, < 0 = conflict)", fontsize=8)
    b.set_title("per transformer layer", fontsize=9)
    b.legend(fontsize=6)
    b.invert_yaxis()
    return _save(fig, out)


def plot_head_similarity(history: list[tuple[int, dict]], out: Path) -> Path:
    """Mean inter-head cosine of the heads' contributions per layer (one panel per module kind, one curve per
    recorded step; dashed: the learned increments ``X − X(0)`` where they differ)."""
    kinds = sorted({k for _, r in history for k in r["by_module"]})
    quantity = history[-1][1].get("quantity", "B_i") if history else "B_i"
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(3.6 * (len(kinds) + 1), 3.4), dpi=110, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes[0], kinds):
        for i, (step, r) in enumerate(history):
            e = r["by_module"].get(kind)
            if e is None:
                continue
            x = [j if li is None else li for j, li in enumerate(e["layer"])]
            color = cmap(i / max(len(history) - 1, 1))
            y = [np.nan if v is None else v for v in e["similarity"]]
            ax.plot(x, y, "o-", ms=3, color=color, label=f"step {step}")
            inc = [np.nan if v is None else v for v in e.get("increment", [])]
            if inc and not np.allclose(np.nan_to_num(inc, nan=9), np.nan_to_num(y, nan=9)):
                ax.plot(x, inc, "x--", ms=3, color=color, lw=0.8)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean off-diagonal cosine of {quantity}", fontsize=8)
        integer_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, title="dashed: X − X(0)", title_fontsize=6)
    last = axes[0][-1]
    pts = [(s, r["mean"]) for s, r in history if r.get("mean") is not None]
    if pts:
        last.plot(*zip(*pts), "o-", label=quantity)
    pts = [(s, r["mean_increment"]) for s, r in history if r.get("mean_increment") is not None]
    if pts:
        last.plot(*zip(*pts), "x--", label=f"{quantity} − init")
    last.set_title("mean over layers", fontsize=9)
    last.set_xlabel("step")
    last.legend(fontsize=6)
    integer_axis(last.xaxis)
    last.grid(alpha=0.3)
    return _save(fig, out)


def plot_scatter(xy, labels, title: str, out: Path) -> Path:
    """2-D scatter (t-SNE) coloured by label."""
    xy = np.asarray(xy)
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
    for lab in sorted(set(labels), key=str):
        sel = np.array([lb == lab for lb in labels])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, label=str(lab), alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, markerscale=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out)


def plot_routing(res: dict, out: Path, step: int) -> Path:
    """Mean routing weights per task (tasks × group·expert) of the middle routed layer, and entropy per layer."""
    mid = res["middle_layer"]
    per_task = res["layers"][mid]["per_task"]
    tasks = list(per_task)
    m = np.array([np.asarray(per_task[t]).reshape(-1) for t in tasks])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    im = a.imshow(m, aspect="auto", cmap="magma", vmin=0)
    a.set_yticks(range(len(tasks)), tasks, fontsize=7)
    a.set_xticks(range(m.shape[1]))
    a.set_xlabel("expert (group-major)")
    a.set_title(f"mean routing weights, {mid.replace('model.', '')}, step {step}", fontsize=8)
    fig.colorbar(im, ax=a, fraction=0.046)
    names = list(res["layers"])
    b.plot(
        range(len(names)),
        [res["layers"][n]["entropy"] for n in names],
        "o-",
        label=f"entropy ({res['protocol']})",
    )
    b.plot(range(len(names)), [res["layers"][n]["cv2"] for n in names], "s-", label="usage CV² (pooled)")
    b.plot(
        range(len(names)),
        [res["layers"][n]["cv2_per_batch"] for n in names],
        "^-",
        label="usage CV² (per batch)",
    )
    b.set_xticks(
        range(len(names)), [n.replace("model.", "") for n in names], rotation=60, ha="right", fontsize=6
    )
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    return _save(fig, out)


def plot_spectral(res: dict, out: Path, step: int) -> Path:
    """Cross-expert alignment share and SV importance per band (multi-head adapters only: the panel is left out
    without multi-head layers, e.g. plain LoRA), and the B spectra, one line per layer."""
    bands = [f"{p0:g}–{p1:g}%" for p0, p1 in res["bands"]]
    al = [np.nan if v is None else v for v in res["alignment_pct"]]
    imp = [np.nan if v is None else v for v in res["sv_importance_pct"]]
    has_bands = bool(np.isfinite(al).any() or np.isfinite(imp).any())
    fig, axes = plt.subplots(
        1, 2 if has_bands else 1, figsize=(10 if has_bands else 5.6, 3.6), dpi=110, squeeze=False
    )
    b = axes[0][-1]
    if has_bands:
        a = axes[0][0]
        x = np.arange(len(bands))
        a.bar(x - 0.2, al, 0.4, label="cross-expert alignment (%)")
        a.bar(x + 0.2, imp, 0.4, label="SV importance (%)")
        a.set_xticks(x, bands)
        a.set_ylim(bottom=0)
        a.set_title(f"SV bands of {res['quantity']} ({res['edges']} edges), step {step}", fontsize=8)
        a.legend(fontsize=7)
    curves = [
        (
            name.replace("model.", "").replace("layers.", "L"),
            np.atleast_2d(np.asarray(e["B"], dtype=float)).mean(0),
        )
        for name, e in res["spectra"].items()
        if "B" in e
    ]
    _layer_lines(b, curves, alpha=0.8, lw=1)
    b.set_xlabel("SV index (descending)")
    b.set_ylabel("σ of B (mean over heads)")
    b.set_ylim(bottom=0)
    integer_axis(b.xaxis)
    b.set_title(
        f"spectra, one line per layer, step {step}" if not has_bands else "spectra, one line per layer",
        fontsize=9,
    )
    b.grid(alpha=0.3)
    return _save(fig, out)


def plot_divergence(res: dict, out: Path, step: int) -> Path:
    """Pairwise symmetric KL and MMD² between tasks (mean over layers)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    _heatmap(
        a,
        res["kl_matrix"],
        res["tasks"],
        f"symmetric KL, step {step} (mean {res['kl']:.3g}, per dim {res['kl_per_dim']:.3g})",
        cmap="viridis",
    )
    _heatmap(b, res["mmd_matrix"], res["tasks"], f"MMD², step {step} (mean {res['mmd']:.3g})", cmap="viridis")
    return _save(fig, out)


def plot_scatter_grid(panels: list[tuple[str, np.ndarray, list]], out: Path, step: int) -> Path:
    """Several 2-D scatters (t-SNE of each parameter group), each coloured by its labels."""
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), dpi=100, squeeze=False)
    for ax, (title, xy, labels) in zip(axes.ravel(), panels):
        xy = np.asarray(xy)
        for lab in sorted(set(labels), key=str):
            sel = np.array([lb == lab for lb in labels])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=14, label=str(lab), alpha=0.8)
        ax.set_title(f"{title}, step {step}", fontsize=8)
        ax.legend(fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return _save(fig, out)


def plot_head_similarity_runs(cmp: dict, out: Path) -> Path:
    """Head similarity of several runs on one quantity (:func:`mtlora.diagnostics.compare.compare_heads`):
    one panel per module type, one curve per run."""
    kinds = sorted({k for r in cmp["runs"].values() for k in r["by_module"]})
    fig, axes = plt.subplots(
        1, max(len(kinds), 1), figsize=(3.8 * max(len(kinds), 1), 3.4), dpi=110, squeeze=False
    )
    for ax, kind in zip(axes[0], kinds):
        for label, r in cmp["runs"].items():
            e = r["by_module"].get(kind)
            if e is None:
                continue
            x = [j if li is None else li for j, li in enumerate(e["layer"])]
            ax.plot(x, [np.nan if v is None else v for v in e["value"]], "o-", ms=3, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean off-diagonal cosine of {cmp['quantity']}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, out)


def plot_conflict_runs(cmp: dict, out: Path) -> Path:
    """Mean pairwise gradient cosine per transformer layer of several runs
    (:func:`mtlora.diagnostics.compare.compare_conflict`), with each run's same-task noise floor."""
    layers = cmp["layers"]
    x = np.arange(len(layers))
    runs = list(cmp["per_layer"])
    w = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 2), 3.8), dpi=110)
    for i, label in enumerate(runs):
        e = cmp["per_layer"][label]
        vals = [np.nan if e[k]["mean_cosine"] is None else e[k]["mean_cosine"] for k in layers]
        floor = [np.nan if e[k]["noise_floor"] is None else e[k]["noise_floor"] for k in layers]
        pos = x - 0.4 + w * (i + 0.5)
        bars = ax.bar(pos, vals, w, label=label)
        ax.plot(pos, floor, "_", ms=12, mew=2, color=bars.patches[0].get_facecolor() if bars.patches else "k")
    ax.set_xticks(x, [_layer_label(k) for k in layers], rotation=60, ha="right", fontsize=6)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("mean pairwise gradient cosine\n(higher = tasks agree, < 0 = conflict)", fontsize=8)
    ax.set_title("per transformer layer (dashes: same-task noise floor)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out)
