"""Overhead of the default diagnostics schedule: a tiny training run with ``diagnostics=none`` vs ``default``.

Trains the embedded tiny model (2 layers, synthetic tasks) in this process for ``--steps`` optimizer
steps, once per setting and ``--repeats`` times alternating, and reports

* ``wall``: the median wall time of ``run_training`` (model/data setup included, identical in both);
* ``diag_s``: the time spent inside the diagnostics runner (plots included), measured directly;
* ``overhead``: ``diag_s / (wall_default − diag_s)`` — the diagnostics' share of the training time — and
  the wall-time difference ``(wall_default − wall_none) / wall_none`` (noisier on a shared machine).

Usage::

    python scripts/bench_diagnostics.py                      # hydralora, 1500 steps (one epoch of the default mixture)
    python scripts/bench_diagnostics.py --adapter lora --steps 300 --repeats 3
    python scripts/bench_diagnostics.py --extra diagnostics.every_steps=50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mtlora

from mtlora.config.compose import compose_train_config  # noqa: E402
from mtlora.diagnostics.runner import DiagnosticsRunner  # noqa: E402
from mtlora.procedures.finetune.recipe import run_training  # noqa: E402
from mtlora.run.layout import RunLayout  # noqa: E402


def timed_runner_seconds() -> list[float]:
    """Patch :meth:`DiagnosticsRunner.run` to add its wall time to the returned one-element list."""
    spent = [0.0]
    original = DiagnosticsRunner.run

    def run(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    DiagnosticsRunner.run = run
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="hydralora")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (hardware.num_threads)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for both runs")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    spent = timed_runner_seconds()
    base = [
        f"adapter={args.adapter}",
        "logger=none",
        "eval=none",
        f"train.max_steps={args.steps}",
        "train.log_every=50",
        f"hardware.num_threads={args.threads}",
        *args.extra,
    ]
    walls: dict[str, list[float]] = {"none": [], "default": []}
    diag: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for setting in ("none", "default"):
                d = Path(tmp) / f"{setting}_{i}"
                d.mkdir()
                cfg = compose_train_config([*base, f"diagnostics={setting}"], run_dir=d)
                spent[0] = 0.0
                t = time.perf_counter()
                run_training(cfg, d)
                walls[setting].append(time.perf_counter() - t)
                if setting == "default":
                    diag.append(spent[0])
                    n = len(RunLayout(d).log("diagnostics").read_text().splitlines())
    w_none, w_def, d_s = (statistics.median(v) for v in (walls["none"], walls["default"], diag))
    print(f"adapter={args.adapter} steps={args.steps} repeats={args.repeats} threads={args.threads}")
    print(f"| setting | wall s (median) |\n|---|---|\n| none | {w_none:.2f} |\n| default | {w_def:.2f} |")
    print(f"diagnostics runner: {d_s:.2f} s, {n} records")
    print(f"overhead (runner time / training time): {100 * d_s / (w_def - d_s):.2f}%")
    print(f"overhead (wall difference): {100 * (w_def - w_none) / w_none:.2f}%")


if __name__ == "__main__":
    main()
