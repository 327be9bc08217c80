"""Run the configured diagnostics (``diagnostics=`` config group) and write their records and plots.

Every run of a diagnostic appends one record to ``<run_dir>/metrics/diagnostics.jsonl``::

    {"step": 40, "diagnostic": "conflict", "event": "init|step|end|diagnose", "source": "train|diagnose",
     "seconds": 0.12, ...the diagnostic's result (plain JSON, NaN as null)}

logs its scalars to the run's tracker (``diag/<diagnostic>/<name>``, wandb when enabled) and, at the
training events of ``plot_at`` (default: the end) and from ``python -m mtlora.diagnose``, writes plots under
``<run_dir>/plots/diagnostics/`` (the head-similarity plot shows every recorded step).

Schedule (training): every diagnostic of ``which`` at init (``at_init``, before the first step, fresh runs
only) and at the end (``at_end``); the ``periodic`` ones also every ``every_steps`` optimizer steps. Runs
happen on the main process with the model in eval mode (train mode restored afterwards) inside
``torch.random.fork_rng``, and draw their rows with their own seeded NumPy generators, so a run with
diagnostics logs the same training losses as one without. A diagnostic that does not apply to the
run's adapter (head similarity without heads, routing without a token router, ...) is skipped with
one info line. When the gradient cosines do not clear their same-task noise floor, a warning says so.

Rows: gradient conflict — ``batches_per_task`` batches of ``batch_size`` training rows per task;
routing — ``max_examples_per_task`` training rows per task in mixed-task batches (``protocol=tokens``) or
``max_examples`` prompts pooled over the tasks in left-padded batches (``protocol=notebook``); divergence
and t-SNE of representations — held-out rows. The initial heads for the head-similarity increments are read
from the run dir (:data:`mtlora.diagnostics.heads.INIT_FILE`, written by the training loop).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mtlora.diagnostics import diagnostic_plots as plots
from mtlora.diagnostics.common import jsonable, mixed_batches, pooled_prompt_batches, task_batches
from mtlora.diagnostics.config import DIAGNOSTICS, _get, _plain, check_diagnostics_config
from mtlora.diagnostics.conflict import gradient_conflict
from mtlora.diagnostics.divergence import collect_representations, representation_divergence
from mtlora.diagnostics.heads import head_similarity, load_initial_heads
from mtlora.diagnostics.routing import routing_stats
from mtlora.diagnostics.spectral import DEFAULT_BANDS, spectral_stats
from mtlora.diagnostics.tsne import parameter_tsne, representation_tsne, tsne_available
from mtlora.errors import ConfigError
from mtlora.run.metrics import JsonlLog

log = logging.getLogger(__name__)

_WHY = {
    "heads": "no adapter layer has 2 or more up-projection heads",
    "routing": "no adapter layer routes tokens with a router",
    "conflict": "fewer than 2 tasks with training rows (or no trainable adapter parameters)",
    "divergence": "fewer than 2 tasks with at least 2 held-out rows, or no captured down-projection",
    "tsne": "fewer than 30 points in every group, or scikit-learn is not installed",
}


class DiagnosticsRunner:
    """Runs diagnostics on ``model`` (an unwrapped, adapter-injected model) with rows of ``data``."""

    def __init__(
        self,
        cfg: DictConfig,
        model: torch.nn.Module,
        data,
        run_dir: Path,
        tracker=None,
        seed: int = 0,
        source: str = "train",
        method: str = "?",
    ) -> None:
        errs = check_diagnostics_config(cfg)
        if errs:
            raise ConfigError("invalid diagnostics config:\n  - " + "\n  - ".join(errs))
        self.cfg = cfg
        self.model = model
        self.data = data
        self.run_dir = Path(run_dir)
        self.tracker = tracker
        self.seed = int(seed)
        self.source = source
        self.method = method
        self.which = [n for n in DIAGNOSTICS if n in list(_get(cfg, "which", []))]
        self.periodic = [n for n in self.which if n in list(_get(cfg, "periodic", []))]
        self.every = _get(cfg, "every_steps")
        self.at_init = bool(_get(cfg, "at_init", True))
        self.at_end = bool(_get(cfg, "at_end", True))
        self.make_plots = bool(_get(cfg, "plots", True))
        self.plot_at = set(_get(cfg, "plot_at", ["end"])) | {"diagnose"}
        self.log = JsonlLog(self.run_dir, "diagnostics")
        self.seconds = 0.0
        self._batches: dict[str, Any] = {}
        self._skipped: set[str] = set()
        self._init_heads: Any = False  # not loaded yet

    # ---------------------------------------------------------------- training hooks

    @classmethod
    def for_training(
        cls, cfg: DictConfig, model, data, run_dir: Path, tracker, enabled: bool, start_step: int
    ):
        """The runner of a training job, or an inert one (``diagnostics`` empty/none, or not the main process).

        Records past ``start_step`` (left by an interrupted run that is resumed) are dropped."""
        dcfg = cfg.get("diagnostics")
        if not enabled or dcfg is None or not list(_get(dcfg, "which", [])):
            return _Inert()
        runner = cls(
            dcfg, model, data, run_dir, tracker, seed=int(cfg.seed), method=str(cfg.adapter.get("method"))
        )
        runner.log.truncate_after(start_step)
        return runner

    def on_start(self, step: int) -> None:
        """Before the first optimizer step of a fresh run: every diagnostic (``at_init``)."""
        if step == 0 and self.at_init:
            self.run(0, "init")

    def on_step(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step``: the periodic diagnostics, or all of them at the last step."""
        if step == total_steps:
            if self.at_end:
                self.run(step, "end")
        elif self.every and step % int(self.every) == 0 and self.periodic:
            self.run(step, "step", self.periodic)

    # ---------------------------------------------------------------- running

    def _rows(self, kind: str):
        """Fixed batches per use (same rows at every call)."""
        if kind not in self._batches:
            c = self.cfg
            if kind == "conflict":
                k, bs = int(_get(c, "conflict.batches_per_task", 8)), int(_get(c, "conflict.batch_size", 16))
                self._batches[kind] = task_batches(self.data, "train", k * bs, bs, self.seed)
            elif kind == "routing":
                bs = int(_get(c, "routing.batch_size", 16))
                if _get(c, "routing.protocol", "tokens") == "notebook":
                    n = int(_get(c, "routing.max_examples", 500))
                    self._batches[kind] = pooled_prompt_batches(self.data, n, bs, self.seed + 1)
                else:
                    n = int(_get(c, "routing.max_examples_per_task", 32))
                    self._batches[kind] = mixed_batches(self.data, "train", n, bs, self.seed + 1)
            else:  # held-out rows for representations
                n, bs = (
                    int(_get(c, "divergence.max_examples_per_task", 64)),
                    int(_get(c, "divergence.batch_size", 32)),
                )
                self._batches[kind] = task_batches(self.data, "eval", n, bs, self.seed + 2)
        return self._batches[kind]

    def run(self, step: int, event: str, which: list[str] | None = None) -> list[dict]:
        """Run ``which`` (default: all configured) now; returns the records written."""
        which = self.which if which is None else [n for n in DIAGNOSTICS if n in which]
        if not which:
            return []
        model = self.model
        was_training = model.training
        devices = (
            [model_device.index or 0]
            if (model_device := next(model.parameters()).device).type == "cuda"
            else []
        )
        np_state = np.random.get_state()
        records: list[dict] = []
        t0 = time.perf_counter()
        try:
            model.eval()
            with torch.random.fork_rng(devices=devices):
                cache: dict = {}
                for name in which:
                    t = time.perf_counter()
                    res = self._compute(name, cache)
                    if res is None:
                        self._skip(name)
                        continue
                    scalars = self._scalars(name, res)
                    rec = {
                        "step": int(step),
                        "diagnostic": name,
                        "event": event,
                        "source": self.source,
                        "seconds": round(time.perf_counter() - t, 4),
                        **jsonable(res),
                    }
                    self.log.write(rec)
                    records.append(rec)
                    if name == "conflict" and res["noise_floor"]["above_cross"] is False:
                        log.warning(
                            "diagnostics at step %d: gradient conflict: %s", step, res["noise_floor"]["note"]
                        )
                    if self.tracker is not None and scalars:
                        self.tracker.log(scalars, step)
                    if self.make_plots and event in self.plot_at:
                        self._plot(name, res, step, event)
        finally:
            model.train(was_training)
            model.adapter_context.begin()
            np.random.set_state(np_state)
            self.seconds += time.perf_counter() - t0
        if records:
            log.info(
                "diagnostics at step %d (%s): %s", step, event, ", ".join(self._summary(r) for r in records)
            )
        return records

    def _skip(self, name: str) -> None:
        if name not in self._skipped:
            self._skipped.add(name)
            log.info(
                "diagnostics: %s skipped for adapter.method=%s (%s)", name, self.method, _WHY.get(name, "n/a")
            )

    def _reps(self, cache: dict) -> dict:
        if "reps" not in cache:
            cache["reps"] = collect_representations(self.model, self._rows("heldout"))
        return cache["reps"]

    def initial_heads(self):
        """The run's initial head contributions (:data:`mtlora.diagnostics.heads.INIT_FILE`), or None."""
        if self._init_heads is False:
            self._init_heads = load_initial_heads(self.run_dir)
        return self._init_heads

    def _compute(self, name: str, cache: dict) -> dict | None:
        names = self.data.task_names
        c = self.cfg
        if name == "heads":
            return head_similarity(self.model, self.initial_heads())
        if name == "conflict":
            exclude = bool(_get(c, "conflict.exclude_task_specific", True))
            return gradient_conflict(self.model, self._rows("conflict"), names, exclude)
        if name == "spectral":
            bands = _plain(OmegaConf.select(c, "spectral.bands")) or DEFAULT_BANDS
            return spectral_stats(self.model, bands, str(_get(c, "spectral.edges", "ceil")))
        if name == "routing":
            protocol = str(_get(c, "routing.protocol", "tokens"))
            return routing_stats(self.model, self._rows("routing"), names, protocol)
        if name == "divergence":
            return representation_divergence(self._reps(cache), names)
        if name == "tsne":
            if not tsne_available():
                return None
            perp = float(_get(self.cfg, "tsne.perplexity", 30.0))
            reps = self._reps(cache)
            layer_names = sorted({n for layers in reps.values() for n in layers})
            layer = _get(self.cfg, "tsne.layer") or (
                layer_names[len(layer_names) // 2] if layer_names else None
            )
            rep = representation_tsne(reps, layer, names, perp) if layer else None
            params = parameter_tsne(self.model, perp)
            if rep is None and not params:
                return None
            return {"representations": rep, "parameters": params, "perplexity": perp}
        raise ValueError(f"unknown diagnostic {name!r}")

    @staticmethod
    def _scalars(name: str, res: dict) -> dict[str, float]:
        out: dict[str, Any] = {}
        if name == "heads":
            out.update({k: res[k] for k in ("mean", "mean_increment", "mean_delta_w")})
        elif name == "conflict":
            out.update({k: res[k] for k in ("mean_cosine", "std", "conflict_ratio", "per_layer_mean")})
            out["noise_floor_mean"] = res["noise_floor"]["mean"]
        elif name == "spectral":
            for (p0, p1), a, i in zip(res["bands"], res["alignment_pct"], res["sv_importance_pct"]):
                out[f"alignment_pct_{p0:g}-{p1:g}"] = a
                out[f"sv_importance_pct_{p0:g}-{p1:g}"] = i
            out["pearson"] = res["pearson"]
        elif name == "routing":
            out.update({k: res[k] for k in ("entropy", "cv2", "cv2_per_batch")})
        elif name == "divergence":
            out.update({k: res[k] for k in ("kl", "kl_per_dim", "mmd")})
        return {f"diag/{name}/{k}": float(v) for k, v in out.items() if v is not None}

    @staticmethod
    def _summary(rec: dict) -> str:
        n = rec["diagnostic"]
        keys = {
            "heads": ["quantity", "mean", "mean_increment"],
            "conflict": ["mean_cosine", "conflict_ratio"],
            "routing": ["entropy", "cv2"],
            "divergence": ["kl", "kl_per_dim", "mmd"],
            "spectral": ["alignment_pct", "sv_importance_pct"],
        }.get(n, [])
        vals = []
        for k in keys:
            v = rec.get(k)
            if isinstance(v, str):
                vals.append(v)
            elif isinstance(v, float):
                vals.append(f"{k}={v:.4g}")
            elif isinstance(v, list):
                vals.append(f"{k}=[" + ", ".join("-" if x is None else f"{x:.3g}" for x in v) + "]")
        floor = (rec.get("noise_floor") or {}).get("mean")
        if n == "conflict" and floor is not None:
            vals.append(f"noise_floor={floor:.3g}")
        return f"{n}({' '.join(vals)})" if vals else n

    def _plot(self, name: str, res: dict, step: int, event: str) -> None:
        out = self.run_dir / "plots" / "diagnostics"
        tag = f"{event}_step{step}"
        try:
            if name == "conflict":
                plots.plot_conflict(res, out / f"conflict_{tag}.png", step)
            elif name == "heads":
                history = [
                    (r["step"], r)
                    for r in self.log.read()
                    if r.get("diagnostic") == "heads" and r.get("source") == self.source
                ]
                plots.plot_head_similarity(
                    history,
                    out
                    / ("head_similarity.png" if self.source == "train" else "head_similarity_diagnose.png"),
                )
            elif name == "routing":
                plots.plot_routing(res, out / f"routing_{tag}.png", step)
            elif name == "spectral":
                plots.plot_spectral(res, out / f"spectral_{tag}.png", step)
            elif name == "divergence":
                plots.plot_divergence(res, out / f"divergence_{tag}.png", step)
            elif name == "tsne":
                if res["representations"] is not None:
                    r = res["representations"]
                    plots.plot_scatter(
                        r["xy"],
                        r["labels"],
                        f"t-SNE of A-space representations, {r['layer']}, step {step}",
                        out / f"tsne_representations_{tag}.png",
                    )
                if res["parameters"]:
                    plots.plot_scatter_grid(
                        [(g, p["xy"], p["labels"]) for g, p in res["parameters"].items()],
                        out / f"tsne_parameters_{tag}.png",
                        step,
                    )
        except Exception as e:  # a plot must never stop training
            log.warning("diagnostics: plot of %s at step %d failed: %r", name, step, e)


class _Inert:
    """Stands in for the runner when diagnostics are off (or on non-main processes)."""

    seconds = 0.0

    def on_start(self, step: int) -> None:
        pass

    def on_step(self, step: int, total_steps: int) -> None:
        pass
