"""Compare the diagnostics of several runs, like with like (``docs/methods.md`` §10).

``python -m mtlora.diagnostics.compare RUN_A RUN_B [...] [--labels a b ...] [--out DIR]`` reads the last
record of each diagnostic in every run's ``metrics/diagnostics.jsonl`` (run the diagnostics first, e.g.
``python -m mtlora.diagnose run_dir=R``) and writes ``compare.json`` and plots into ``DIR`` (default: the
current directory):

* **heads**: inter-head similarity per module type and layer. When every run compares the same quantity
  (e.g. ``B_i`` for shared-``A`` methods) that quantity is shown; when they differ (``B_i`` vs MoLoRA's
  ``B_i A_i``) all runs are compared on ``ΔW_i = B_i A_i`` (``delta_w``), which every method has — never
  ``B_i`` of one method against ``B_i A_i`` of another;
* **conflict**: the mean pairwise gradient cosine per transformer layer index (so component- and
  block-level runs compare layer by layer), its difference to the first run (the reference), the
  same-task noise floor of each run, and mtLoRA's relative drop of the mean cosine
  (:func:`mtlora.diagnostics.conflict.cosine_drop_pct`, ``None`` when the reference mean is ≤ 0);
* **divergence**: ``kl_per_dim`` next to ``kl`` (the KL grows with the rank; compare ranks on the former).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtlora.diagnostics.conflict import cosine_drop_pct
from mtlora.diagnostics.diagnostic_plots import layer_order
from mtlora.errors import ConfigError

#: characters of a path that Hydra's override grammar reads as syntax unless the value is quoted
_HYDRA_SYNTAX = set("=,[]{}()'\" $\\")


def diagnose_command(run_dir: str | Path) -> str:
    """The ``python -m mtlora.diagnose`` command for ``run_dir``, quoted for the shell and Hydra when the path
    holds Hydra syntax (multirun job dirs are named ``<n>_<key>=<value>,...``)."""
    s = str(run_dir)
    if _HYDRA_SYNTAX.isdisjoint(s):
        return f"python -m mtlora.diagnose run_dir={s}"
    return f"python -m mtlora.diagnose \"run_dir='{s}'\""


DELTA_W = "delta_w"


def last_records(run_dir: str | Path) -> dict[str, dict]:
    """``{diagnostic: its last record}`` of ``run_dir/metrics/diagnostics.jsonl``."""
    path = Path(run_dir) / "metrics" / "diagnostics.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run the diagnostics first ({diagnose_command(run_dir)})")
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["diagnostic"]] = rec
    return out


def compare_heads(recs: dict[str, dict]) -> dict:
    """Head similarity of the runs on one common quantity (see the module doc).

    Returns ``{"key" ("similarity" | "delta_w"), "quantity", "note", "runs": {label: {"quantity" (the
    run's own), "mean", "by_module": {kind: {"layer": [...], "value": [...]}}}}}``."""
    own = {label: r["quantity"] for label, r in recs.items()}
    same = len(set(own.values())) == 1
    key, quantity = ("similarity", next(iter(own.values()))) if same else (DELTA_W, "ΔW_i = B_i A_i")
    note = (
        f"every run compares {quantity}"
        if same
        else f"the runs compare different quantities ({own}): all are compared on ΔW_i = B_i A_i"
    )
    runs = {}
    for label, r in recs.items():
        mean = r["mean"] if same else r.get("mean_delta_w")
        by_module = {
            kind: {"layer": e["layer"], "value": e["similarity"] if same else e[DELTA_W]}
            for kind, e in r["by_module"].items()
        }
        runs[label] = {"quantity": own[label], "mean": mean, "by_module": by_module}
    return {"key": key, "quantity": quantity, "note": note, "runs": runs}


def compare_conflict(recs: dict[str, dict]) -> dict:
    """Gradient cosines of the runs, globally and per transformer layer, against the first run.

    Returns ``{"reference", "runs": {label: {"mean_cosine", "conflict_ratio", "noise_floor",
    "floor_above_cross", "cosine_drop_pct"}}, "layers": [index...], "per_layer": {label: {index:
    {"mean_cosine", "delta", "noise_floor"}}}}``; ``delta`` = the run's mean cosine − the reference's."""
    ref = next(iter(recs))
    ref_layers = {str(k): v for k, v in recs[ref]["per_layer"].items()}
    layers = layer_order({str(k) for r in recs.values() for k in r["per_layer"]})
    runs, per_layer = {}, {}
    for label, r in recs.items():
        runs[label] = {
            "mean_cosine": r["mean_cosine"],
            "conflict_ratio": r["conflict_ratio"],
            "noise_floor": r["noise_floor"]["mean"],
            "floor_above_cross": r["noise_floor"]["above_cross"],
            "cosine_drop_pct": cosine_drop_pct(recs[ref]["mean_cosine"], r["mean_cosine"]),
        }
        own = {str(k): v for k, v in r["per_layer"].items()}
        entry = {}
        for k in layers:
            v, base = own.get(k), ref_layers.get(k)
            c = None if v is None else v["mean_cosine"]
            b = None if base is None else base["mean_cosine"]
            entry[k] = {
                "mean_cosine": c,
                "delta": None if c is None or b is None else c - b,
                "noise_floor": None if v is None else v.get("noise_floor"),
            }
        per_layer[label] = entry
    return {"reference": ref, "runs": runs, "layers": layers, "per_layer": per_layer}


def compare_divergence(recs: dict[str, dict]) -> dict:
    return {
        "note": "kl grows with the representation's dimension (the rank): compare runs of different rank on "
        "kl_per_dim",
        "runs": {
            label: {k: r.get(k) for k in ("kl", "kl_per_dim", "mmd", "dims")} for label, r in recs.items()
        },
    }


def compare_runs(run_dirs: list[str | Path], labels: list[str] | None = None) -> dict:
    """The comparisons of every diagnostic that all runs recorded (heads, conflict, divergence)."""
    labels = labels or [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels {labels}: give one distinct label per run dir ({len(run_dirs)})")
    records = {label: last_records(d) for label, d in zip(labels, run_dirs)}
    out: dict = {"runs": dict(zip(labels, map(str, run_dirs)))}
    for name, fn in (
        ("heads", compare_heads),
        ("conflict", compare_conflict),
        ("divergence", compare_divergence),
    ):
        if all(name in r for r in records.values()):
            out[name] = fn({label: r[name] for label, r in records.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    from mtlora.diagnostics import diagnostic_plots as plots

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "run_dirs", nargs="+", help="run dirs with metrics/diagnostics.jsonl (the first is the reference)"
    )
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    res = compare_runs(args.run_dirs, args.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(res, indent=1))
    if "heads" in res:
        plots.plot_head_similarity_runs(res["heads"], out / "compare_heads.png")
        print(f"heads: {res['heads']['note']}")
    if "conflict" in res:
        plots.plot_conflict_runs(res["conflict"], out / "compare_conflict.png")
        for label, v in res["conflict"]["runs"].items():
            print(f"conflict {label}: {json.dumps(v)}")
    if "divergence" in res:
        print(f"divergence: {res['divergence']['note']}")
    print(f"-> {out / 'compare.json'}")


if __name__ == "__main__":
    import sys

    from mtlora.cli.entry import run_main

    sys.exit(run_main(main))
