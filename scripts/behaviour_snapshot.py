"""Behaviour snapshot: what a refactor must leave unchanged, written to JSON and compared exactly.

Two parts, each keyed by name:

* ``configs`` -- a digest (or with ``--full`` the whole) of the resolved config of every paper preset (``experiment=<paper>/<table>/<cell>``) and of
  the default job with every adapter group (``adapter=<name>``), as ``python -m mtlora.train --cfg job
  --resolve`` would print it (``paths`` dropped: they name this machine's directories);
* ``series`` -- the logged per-step series (``loss``, ``grad_norm``, ``align_loss``, ``aux_loss``,
  ``reg_loss``) of the default job (``--default-steps`` steps, no evaluation), of one smoke-form preset per
  method family (``--steps`` steps, the smoke form of ``scripts/preset_health.py``), of the adapter groups no
  preset uses, and the objective values of one LoraHub composition.

``--write FILE`` records a snapshot; ``--compare FILE`` takes a new one and lists every key whose value
differs (floats compared exactly), exiting 1 when any does.

Usage::

    python scripts/behaviour_snapshot.py --write docs/benchmarks/behaviour_snapshot.json   # ~6 min
    python scripts/behaviour_snapshot.py --compare docs/benchmarks/behaviour_snapshot.json
    python scripts/behaviour_snapshot.py --compare F --only configs                     # configs only, ~1 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import preset_health as ph  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

#: one smoke-form preset per method family (method x alignment)
FAMILY_PRESETS = (
    "align_lora/t4/a_lora_k",
    "align_lora/t4/a_lora_m",
    "align_lora/t4/hydralora",
    "align_lora/t4/mlora",
    "align_lora/t4/rlora",
    "align_lora/t4/lora_moe",
    "align_lora/t4/lora_r10",
    "mtl_lora/commonsense/dora",
    "mtl_lora/commonsense/moelora",
    "mtl_lora/commonsense/mtl_lora",
    "mtl_lora/commonsense/multilora",
    "mtlora/main/mtlora_bbh",
    "mtlora/main/mmoelora_bbh",
    "mtlora/ablation/block_spectral_bbh",
)
#: adapter groups that no preset above trains: run on the default job's smoke form
EXTRA_ADAPTERS = ("meta_lora", "lora_split", "mtlora_component", "align_kl", "align_mmd")
LORAHUB_PRESET = "mtlora/main/lorahub_bbh"
SERIES_KEYS = ("loss", "grad_norm", "align_loss", "aux_loss", "reg_loss")


def adapter_groups() -> list[str]:
    return sorted(p.stem for p in (ph.CONF / "adapter").glob("*.yaml"))


def resolved(overrides: list[str]) -> dict[str, Any]:
    cfg = ph.compose(overrides)
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("paths", None)
    return out


def digest(node: Any) -> str:
    """A short hash of ``node``'s canonical JSON."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()[:16]


def configs(full: bool = False) -> dict[str, Any]:
    """Every resolved config, or (``full=False``) a digest of each."""
    keep = (lambda c: c) if full else digest
    snap: dict[str, Any] = {"default": keep(resolved([]))}
    for name in adapter_groups():
        snap[f"adapter={name}"] = keep(resolved([f"adapter={name}"]))
    for preset in ph.list_presets():
        snap[f"experiment={preset}"] = keep(resolved([f"experiment={preset}"]))
    return snap


def _series(run_dir: Path) -> dict[str, list]:
    path = run_dir / "metrics" / "train.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {k: [r.get(k) for r in recs] for k in SERIES_KEYS if any(k in r for r in recs)}


def _train(overrides: list[str], run_dir: Path) -> dict[str, list]:
    checker = ph.Checker(run_dir.parent)
    cfg = ph.compose(overrides, run_dir)
    stats = checker._train(cfg, keep=True)
    if stats.error:
        raise SystemExit(f"behaviour_snapshot: {' '.join(overrides)} failed: {stats.error}")
    out = _series(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def series(work: Path, steps: int, default_steps: int) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    default = [f"train.max_steps={default_steps}", "eval.suites=[]", "eval.at_end=false", "train.log_every=1"]
    snap["default"] = _train(default, work / "default")
    for preset in FAMILY_PRESETS:
        p = ph.plan(preset, steps=steps)
        snap[f"experiment={preset}"] = _train(p.overrides, work / preset.replace("/", "__"))
    # 2 rows of each of the 5 smoke tasks: what task-balanced methods (MeTA-LoRA, alignment) need
    smoke = [*ph.SMOKE, f"train.max_steps={steps}", "train.optimizer.lr=1e-2", "train.micro_batch_size=10"]
    for name in EXTRA_ADAPTERS:
        snap[f"adapter={name}"] = _train([*smoke, f"adapter={name}"], work / f"adapter_{name}")
    checker = ph.Checker(work / "lorahub", steps=steps)
    p = ph.plan(LORAHUB_PRESET, steps=steps)
    row = checker._check_lorahub(p, ph.Row(LORAHUB_PRESET, p.method, p.alignment, ""))
    name, res, stats = next(iter(checker.compositions.values()))
    snap[f"experiment={LORAHUB_PRESET}"] = {
        "verdict": row.verdict,
        "error": stats.error,
        "objective": [e["loss"] for e in res["evaluations"]] if res else None,
        "ce": res.get("ce") if res else None,
        "ce_at_zero": res.get("ce_at_zero") if res else None,
    }
    return snap


def diff(old: Any, new: Any, key: str = "") -> list[str]:
    """Every ``key`` path where ``old`` and ``new`` differ (exact comparison)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in old:
                out.append(f"{sub}: new")
            elif k not in new:
                out.append(f"{sub}: gone")
            else:
                out += diff(old[k], new[k], sub)
        return out
    if old != new:
        return [f"{key}: {json.dumps(old)[:120]} -> {json.dumps(new)[:120]}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog="see the module docstring")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record a snapshot to this JSON file")
    mode.add_argument("--compare", type=Path, help="compare a new snapshot with this recorded one")
    p.add_argument("--only", choices=("configs", "series"), default=None, help="take one part only")
    p.add_argument("--full", action="store_true", help="record whole configs, not their digests")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per smoke preset (default 10)")
    p.add_argument("--default-steps", type=int, default=12, help="steps of the default job (default 12)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    snap: dict[str, Any] = {"steps": args.steps, "default_steps": args.default_steps}
    with ph.quiet_progress_bars(), tempfile.TemporaryDirectory(prefix="mtlora-snapshot-") as tmp:
        if args.only in (None, "configs"):
            snap["configs"] = configs(args.full)
        if args.only in (None, "series"):
            snap["series"] = series(Path(tmp), args.steps, args.default_steps)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
        print(f"behaviour_snapshot: wrote {args.write}")
        return 0
    old = json.loads(args.compare.read_text())
    if args.only:
        old = {k: v for k, v in old.items() if k in (args.only, "steps", "default_steps")}
    changes = diff(old, snap)
    for line in changes:
        print(line)
    print(f"behaviour_snapshot: {len(changes)} difference(s) against {args.compare}")
    return 1 if changes else 0


if __name__ == "__main__":
    raise SystemExit(main())
