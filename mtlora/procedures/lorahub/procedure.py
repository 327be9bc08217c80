"""The ``lorahub`` procedure (``adapter.method=lorahub``): compose the library LoRAs into one LoRA and write
a normal run dir (markers and config stay with the caller): ``meta.json``, ``base_model/``, the composed
LoRA as ``adapter/``, ``metrics/lorahub.json``, and the end-of-run suites of ``eval.suites``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig

from mtlora.eval.heldin import evaluate_heldin
from mtlora.models import count_parameters
from mtlora.procedures.common import (
    build_model_and_data,
    generation_suites_at_end,
    save_run_adapter,
    write_heldin_outputs,
)
from mtlora.procedures.lorahub.compose import (
    Objective,
    fewshot_batches,
    fewshot_rows,
    optimize,
    set_composition,
)
from mtlora.procedures.lorahub.library import (
    check_base_fingerprints,
    load_library_weights,
    preflight_lorahub,
    sample_modules,
)
from mtlora.run.base_model import base_parameters, fingerprint, save_base_model
from mtlora.run.layout import RunLayout
from mtlora.run.manifest import write_meta
from mtlora.run.metrics import JsonlLog
from mtlora.run.tracker import start_tracker
from mtlora.utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: the file of ``metrics/`` that records the composition
RESULT_FILE = "lorahub.json"


def compose_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Compose the library LoRAs for ``cfg`` into ``run_dir``; returns the contents of ``metrics/lorahub.json``."""
    return LoraHubProcedure(cfg, run_dir).run()


class LoraHubProcedure:
    """setup (library, model, few-shot objective, tracker) / compose (optimise the weights) / save (run-dir
    outputs and the end-of-run suites) / cleanup (the tracker)."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir, self.layout = cfg, Path(run_dir), RunLayout(run_dir)

    def run(self) -> dict:
        self.t0 = time.perf_counter()
        self.setup()
        ok = False
        try:
            result = self.compose()
            self.save(result)
            ok = True
        finally:
            self.cleanup(ok)
        return result

    def setup(self) -> None:
        """The library modules, the model (base weights checked against the library's), their stacked
        weights, the few-shot objective and the tracker."""
        cfg = self.cfg
        datasets.disable_progress_bars()
        if cfg.hardware.get("num_threads"):
            torch.set_num_threads(int(cfg.hardware.num_threads))
        self.seed = seed = int(cfg.seed)
        self.library = preflight_lorahub(cfg)
        self.modules = sample_modules(self.library, cfg.adapter.get("num_modules"), seed)
        torch.manual_seed(seed)
        self.tokenizer, self.model, self.data = build_model_and_data(cfg)
        self.device = torch.device(cfg.hardware.device)
        self.model.to(self.device).eval()
        check_base_fingerprints(self.modules, fingerprint(base_parameters(self.model)))
        self.stacks = load_library_weights(self.model, self.modules)
        self.rows = fewshot_rows(self.data, int(cfg.adapter.fewshot_per_task), seed)
        batches = fewshot_batches(self.data, self.rows, int(cfg.eval.batch_size), self.device)
        self.ce_norm = str(cfg.adapter.get("ce_norm", "n_examples"))
        self.choice = str(cfg.adapter.get("result", "recommendation"))
        self.objective = Objective(self.model, self.stacks, batches, float(cfg.adapter.l1), self.ce_norm)
        log.info(
            "LoraHub: composing %d LoRAs (%s), %d few-shot rows, %s budget %d",
            len(self.modules),
            ", ".join(str(d) for d in self.modules),
            sum(len(r) for r in self.rows.values()),
            cfg.adapter.optimizer,
            int(cfg.adapter.budget),
        )
        self.tracker = start_tracker(cfg, self.run_dir)

    def compose(self) -> dict:
        """Optimise the weights, load the chosen ones (``adapter.result``) into the model; returns the
        record of ``metrics/lorahub.json``."""
        cfg, objective = self.cfg, self.objective
        res = optimize(
            objective,
            len(self.modules),
            int(cfg.adapter.budget),
            float(cfg.adapter.weight_bound),
            str(cfg.adapter.optimizer),
            self.seed,
        )
        for r in objective.history:
            self.tracker.log({"lorahub/loss": r["loss"], "lorahub/ce": r["ce"]}, r["eval"])
        best, rec = res["best_evaluated"], res["recommendation"]
        chosen = rec if self.choice == "recommendation" else best
        set_composition(self.model, self.stacks, chosen["weights"])
        self.names = [str(Path(d).resolve()) for d in self.modules]
        self.chosen, self.best, self.rec = chosen, best, rec
        log.info(
            "LoraHub: loaded the %s, loss %.4f (CE %.4f; base model %.4f) at weights %s; best evaluated "
            "loss %.4f, recommendation loss %.4f",
            self.choice,
            chosen["loss"],
            chosen["ce"],
            res["ce_at_zero"],
            ", ".join(f"{w:+.3f}" for w in chosen["weights"]),
            best["loss"],
            rec["loss"],
        )
        return self.record(res)

    def record(self, res: dict) -> dict:
        """The contents of ``metrics/lorahub.json``: the library, the loaded and both candidate weights by
        module, their losses, the settings, the few-shot rows and every evaluation."""
        cfg, names, objective = self.cfg, self.names, self.objective
        chosen, best, rec = self.chosen, self.best, self.rec
        return {
            "library": [str(Path(d).resolve()) for d in self.library],
            "modules": names,
            "result": self.choice,
            "weights": dict(zip(names, chosen["weights"])),
            "loss": chosen["loss"],
            "ce": chosen["ce"],
            "best_evaluated": {
                "weights": dict(zip(names, best["weights"])),
                "loss": best["loss"],
                "ce": best["ce"],
                "eval": best["eval"],
            },
            "recommendation": {
                "weights": dict(zip(names, rec["weights"])),
                "loss": rec["loss"],
                "ce": rec["ce"],
            },
            "loss_at_zero": res["loss_at_zero"],
            "ce_at_zero": res["ce_at_zero"],
            "ce_norm": self.ce_norm,
            "n_examples": objective.n_examples,
            "budget": int(cfg.adapter.budget),
            "optimizer": str(cfg.adapter.optimizer),
            "nevergrad_optimizer": res["nevergrad_optimizer"],
            "weight_bound": float(cfg.adapter.weight_bound),
            "l1": float(cfg.adapter.l1),
            "seed": self.seed,
            "fewshot_per_task": int(cfg.adapter.fewshot_per_task),
            "fewshot_rows": self.rows,
            "fewshot_batch_size": int(cfg.eval.batch_size),
            "evaluations": objective.history,
        }

    def save(self, result: dict) -> None:
        """``meta.json``, ``base_model/``, ``adapter/``, ``metrics/lorahub.json``, the held-in tables of the
        composed LoRA, then the end-of-run generation suites."""
        cfg, model, data, layout = self.cfg, self.model, self.data, self.layout
        write_meta(
            self.run_dir,
            cfg,
            world_size=1,
            parameters=count_parameters(model),
            mixture=data.summary(),
            lorahub={k: result[k] for k in ("modules", "result", "weights", "loss", "budget")},
        )
        save_base_model(cfg.model, model, self.tokenizer, layout.base_model)
        lorahub = {"modules": self.names, "result": self.choice, "weights": self.chosen["weights"]}
        save_run_adapter(cfg, model, self.run_dir, data.task_names, lorahub=lorahub)
        layout.metrics.mkdir(parents=True, exist_ok=True)
        atomic_write_text(layout.metrics / RESULT_FILE, json.dumps(result, indent=2))
        if cfg.eval.at_end and "heldin" in cfg.eval.suites:
            self.heldin_eval()
        self.tracker.summary(
            {
                "lorahub/loss": self.chosen["loss"],
                "lorahub/best_evaluated_loss": self.best["loss"],
                "lorahub/recommendation_loss": self.rec["loss"],
            }
        )
        generation_suites_at_end(cfg, model, self.tokenizer, data, self.run_dir, self.tracker, 0)
        log.info("LoraHub done in %.1f s", time.perf_counter() - self.t0)

    def heldin_eval(self) -> None:
        """The held-in suite on the composed LoRA: ``eval.jsonl`` (step 0) and the held-in tables."""
        cfg = self.cfg
        final = evaluate_heldin(
            self.model,
            self.data,
            int(cfg.eval.batch_size),
            cfg.eval.get("max_examples_per_task"),
            self.device,
        )
        final = {"step": 0, "suite": "heldin", **final}
        JsonlLog(self.run_dir, "eval").write(final)
        md = write_heldin_outputs(self.run_dir, [final], final, self.tracker)
        log.info("held-out eval of the composed LoRA:\n%s", md)

    def cleanup(self, ok: bool) -> None:
        self.tracker.finish(ok)
