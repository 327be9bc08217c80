"""LoraHub (Huang et al. 2023): gradient-free composition of task LoRAs trained by this runner.

``python -m mtlora.train adapter=lorahub adapter.library=[RUN,...]`` (or ``adapter.library_glob=...``)
runs :func:`compose_run` instead of gradient training. With K library LoRAs ``(A_i, B_i)`` (one per run dir,
each a finished ``adapter.method=lora`` run of the same base model, rank, alpha and target modules) and
weights ``w ∈ [-b, b]^K`` (``adapter.weight_bound``, init 0), every adapted layer gets the **factor-wise**
composition (LoraHub's state-dict weighted sum, not ``Σ w_i B_i A_i``)::

    Â = Σ_i w_i A_i,   B̂ = Σ_i w_i B_i,   h = W0 x + s · B̂ Â x

and ``w`` minimises, with a Nevergrad optimizer (``NGOpt``, ``adapter.budget`` evaluations)::

    L(w) = CE̅(w) / n + l1 · (1/K) Σ_i |w_i|     (adapter.ce_norm: n_examples [code])
    L(w) = CE̅(w)     + l1 · (1/K) Σ_i |w_i|     (adapter.ce_norm: none)

``CE̅`` is the mean answer-token cross-entropy of the few-shot set (all its answer tokens pooled) and ``n``
its number of rows: ``adapter.fewshot_per_task`` rows of each task of the run's ``data`` mixture, drawn
without replacement from the task's train split with ``numpy.random.default_rng(cfg.seed)``. The released
``default_get_loss`` sums each batch's token-mean loss and divides by the number of examples; with its
default batch (all examples at once, as ``reproduce_bbh.py``'s batch of 5 for 5 examples) that is
``CE̅ / n``. Batching here (``eval.batch_size``) only bounds memory: the pooled mean does not depend on it.

Result (``adapter.result``): ``recommendation`` [code] — Nevergrad's ``provide_recommendation()`` after the
budget (what the released ``optimizer.minimize`` returns and loads); ``best_evaluated`` — the best point the
optimizer evaluated (w = 0, the base model, is evaluated first and is always a candidate). Both, with their
objective values, are recorded in ``metrics/lorahub.json``.

The run dir is a normal run dir: markers, config, ``meta.json``, ``base_model/``, and the composed LoRA as
``adapter/`` (so :func:`mtlora.load_run`, ``python -m mtlora.export`` and held-in eval work on it; the
registry maps ``adapter.method=lorahub`` to the plain LoRA layer), plus ``metrics/lorahub.json``.
"""

from __future__ import annotations

import glob
import json
import logging
import random
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file

from mtlora.adapters import adapter_layers, adapter_state_dict, save_adapter
from mtlora.adapters.lora import LoraLinear
from mtlora.adapters.state import ADAPTER_WEIGHTS
from mtlora.errors import ConfigError
from mtlora.run.rundir import load_resolved_config
from mtlora.utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: adapter keys every library run must share with the composition (they fix the LoRA's shape and scale)
ADAPTER_KEYS = ("rank", "alpha", "use_rslora", "target_modules")
#: model keys that do not change the base weights (not compared)
MODEL_KEYS_IGNORED = ("default_lr", "max_seq_len")
#: ``adapter.ce_norm``: divide the few-shot CE by the number of few-shot rows (the code) or not
CE_NORMS = ("n_examples", "none")
#: ``adapter.result``: the weights that are loaded and saved
RESULTS = ("recommendation", "best_evaluated")


# ---------------------------------------------------------------------------------------------- config


def check_lorahub_config(cfg: DictConfig) -> None:
    """The lorahub keys of ``cfg.adapter`` and the single-process requirement (raises :class:`ConfigError`)."""
    from mtlora.utils.dist import launched_as_worker

    a, errors = cfg.adapter, []

    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def is_num(v, lo, open_=False):
        return isinstance(v, int | float) and not isinstance(v, bool) and (v > lo if open_ else v >= lo)

    if not is_int(a.get("budget"), 1):
        errors.append(f"adapter.budget={a.get('budget')!r}: must be an integer >= 1")
    if not is_num(a.get("weight_bound"), 0, open_=True):
        errors.append(f"adapter.weight_bound={a.get('weight_bound')!r}: must be a number > 0")
    if not is_num(a.get("l1"), 0):
        errors.append(f"adapter.l1={a.get('l1')!r}: must be a number >= 0")
    if not is_int(a.get("fewshot_per_task"), 1):
        errors.append(f"adapter.fewshot_per_task={a.get('fewshot_per_task')!r}: must be an integer >= 1")
    if a.get("num_modules") is not None and not is_int(a.get("num_modules"), 1):
        errors.append(f"adapter.num_modules={a.get('num_modules')!r}: must be an integer >= 1 or null")
    if not isinstance(a.get("optimizer"), str):
        errors.append(f"adapter.optimizer={a.get('optimizer')!r}: must be a Nevergrad optimizer name")
    if a.get("ce_norm", "n_examples") not in CE_NORMS:
        errors.append(f"adapter.ce_norm={a.get('ce_norm')!r}: must be one of {list(CE_NORMS)}")
    if a.get("result", "recommendation") not in RESULTS:
        errors.append(f"adapter.result={a.get('result')!r}: must be one of {list(RESULTS)}")
    lib = a.get("library")
    if lib is not None and not isinstance(lib, ListConfig | list):
        errors.append(f"adapter.library={lib!r}: must be a list of run dirs")
    if not lib and not a.get("library_glob"):
        errors.append("adapter.library / adapter.library_glob: give the LoRA run dirs to compose")
    if cfg.hardware.get("launcher", "none") != "none" or launched_as_worker():
        errors.append(
            f"hardware.launcher={cfg.hardware.get('launcher')!r}: adapter=lorahub runs in one process "
            "(use hardware=cpu, or hardware.device=cuda)"
        )
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def resolve_library(adapter_cfg: DictConfig) -> list[Path]:
    """``adapter.library`` in its order, then the directories matched by ``adapter.library_glob`` (sorted);
    duplicates dropped. Relative paths are relative to the working directory."""
    dirs = [Path(str(p)) for p in (adapter_cfg.get("library") or [])]
    pattern = adapter_cfg.get("library_glob")
    if pattern:
        matched = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_dir())
        if not matched:
            raise ConfigError(f"adapter.library_glob={pattern!r} matches no directory")
        dirs += matched
    out: list[Path] = []
    for d in dirs:
        if d.resolve() not in {o.resolve() for o in out}:
            out.append(d)
    if not out:
        raise ConfigError("adapter.library / adapter.library_glob: no LoRA run dir to compose")
    return out


def sample_modules(dirs: Sequence[Path], num_modules: int | None, seed: int) -> list[Path]:
    """All ``dirs`` when ``num_modules`` is null (or >= their number), else a seeded sample of that many
    (kept in library order)."""
    if num_modules is None or num_modules >= len(dirs):
        if num_modules is not None and num_modules > len(dirs):
            raise ConfigError(
                f"adapter.num_modules={num_modules}: the library holds only {len(dirs)} run dirs"
            )
        return list(dirs)
    picked = sorted(random.Random(seed).sample(range(len(dirs)), num_modules))
    return [dirs[i] for i in picked]


def _flat(d, prefix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def check_library_run(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Check that ``run_dir`` is a finished plain-LoRA run whose base model and LoRA shape match ``cfg``;
    returns its resolved config. Errors name the run dir and the first mismatching key."""
    from mtlora.load import RunLoadError, check_run_dir

    try:
        check_run_dir(run_dir)
    except RunLoadError as e:
        raise ConfigError(f"LoraHub library: {e}") from e
    lib = load_resolved_config(run_dir)
    where = f"LoraHub library run {run_dir}"
    if lib.adapter.get("method") != "lora":
        raise ConfigError(
            f"{where}: adapter.method={lib.adapter.get('method')!r}, but LoraHub composes plain LoRAs "
            "(adapter.method='lora')"
        )
    for key in ADAPTER_KEYS:
        mine, theirs = cfg.adapter.get(key), lib.adapter.get(key)
        if isinstance(mine, ListConfig):
            mine = list(mine)
        if isinstance(theirs, ListConfig):
            theirs = list(theirs)
        if mine != theirs:
            raise ConfigError(
                f"{where}: adapter.{key}={theirs!r}, but this composition has adapter.{key}={mine!r}; "
                f"every library LoRA must have the composition's rank, alpha, use_rslora and target "
                f"modules (set adapter.{key}=... to match)"
            )
    mine = _flat(OmegaConf.to_container(cfg.model, resolve=True), "model")
    theirs = _flat(OmegaConf.to_container(lib.model, resolve=True), "model")
    for key in sorted(set(mine) | set(theirs)):
        if key.split(".", 1)[1] in MODEL_KEYS_IGNORED:
            continue
        if mine.get(key) != theirs.get(key):
            raise ConfigError(
                f"{where}: {key}={theirs.get(key)!r}, but this composition has {key}={mine.get(key)!r}; "
                "the library LoRAs must share the composition's base model (pass the same model=...)"
            )
    return lib


def preflight_lorahub(cfg: DictConfig) -> list[Path]:
    """Config and library checks that load no weights; returns the library run dirs."""
    check_lorahub_config(cfg)
    dirs = resolve_library(cfg.adapter)
    for d in dirs:
        check_library_run(cfg, d)
    return dirs


# ------------------------------------------------------------------------------------------ composition


def compose_factors(w: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor):
    """``(Σ_i w_i A_i, Σ_i w_i B_i)`` for stacks ``A: (K, r, d_in)``, ``B: (K, d_out, r)``."""
    w = w.to(a_stack.dtype)
    return torch.tensordot(w, a_stack, dims=1), torch.tensordot(w, b_stack, dims=1)


def load_library_weights(model: torch.nn.Module, dirs: Sequence[Path]) -> dict[str, tuple]:
    """Per LoRA layer of ``model``: the stacked ``(A_stack, B_stack)`` of the library runs (same order as
    ``dirs``), on the layer's device. The weight keys and shapes must equal the model's."""
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, LoraLinear)}
    expected = adapter_state_dict(model)
    states = []
    for d in dirs:
        state = load_file(str(Path(d) / "adapter" / ADAPTER_WEIGHTS))
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"LoraHub library run {d}: adapter weights do not fit the composition's LoRA layers: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ConfigError(
                    f"LoraHub library run {d}: adapter weight {k} has shape {tuple(v.shape)}, "
                    f"the composition's LoRA expects {tuple(expected[k].shape)}"
                )
        states.append(state)
    out = {}
    for name, layer in layers.items():
        dev = layer.lora_A.device
        a = torch.stack([s[f"{name}.lora_A"] for s in states]).to(dev, torch.float32)
        b = torch.stack([s[f"{name}.lora_B"] for s in states]).to(dev, torch.float32)
        out[name] = (a, b)
    return out


@torch.no_grad()
def set_composition(model: torch.nn.Module, stacks: dict[str, tuple], w) -> None:
    """Write ``Â = Σ w_i A_i`` and ``B̂ = Σ w_i B_i`` into the LoRA layers' parameters, in place."""
    w = torch.as_tensor(np.asarray(w, dtype=np.float32))
    layers = adapter_layers(model)
    for name, (a, b) in stacks.items():
        layer = layers[name]
        a_hat, b_hat = compose_factors(w.to(a.device), a, b)
        layer.lora_A.copy_(a_hat)
        layer.lora_B.copy_(b_hat)


def fewshot_rows(data, per_task: int, seed: int) -> dict[str, list[int]]:
    """``per_task`` train rows of each task (all when fewer), without replacement, seeded; by task name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, ds in zip(data.task_names, data.train):
        k = min(per_task, len(ds))
        out[name] = sorted(int(i) for i in rng.choice(len(ds), size=k, replace=False))
    return out


def fewshot_batches(data, rows: dict[str, list[int]], batch_size: int, device) -> list[dict]:
    """The few-shot rows collated into batches of ``batch_size`` (task order, then row order)."""
    pairs = [(data.task_names.index(n), i) for n, idx in rows.items() for i in idx]
    batches = []
    for s in range(0, len(pairs), batch_size):
        b = data.batch(np.asarray(pairs[s : s + batch_size]))
        batches.append({k: v.to(device) for k, v in b.items()})
    return batches


@torch.no_grad()
def fewshot_ce(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Mean cross-entropy per answer token over all ``batches`` (tokens pooled), in eval mode."""
    from mtlora.losses.causal_lm import token_cross_entropy

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for b in batches:
        model.adapter_context.begin(task_ids=b["task_ids"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce, mask = token_cross_entropy(logits, b["labels"])
        total += float(ce.sum())
        tokens += int(mask.sum())
    if was_training:
        model.train()
    return total / max(tokens, 1)


class Objective:
    """``L(w) = CE̅(w) / n + l1 · mean|w|`` (``ce_norm="n_examples"``, ``n`` = rows of ``batches``) or
    ``CE̅(w) + l1 · mean|w|`` (``"none"``); every call is recorded in :attr:`history`. Equal weight vectors
    are evaluated once (Nevergrad may ask a point twice; the objective is deterministic)."""

    def __init__(
        self, model, stacks: dict[str, tuple], batches: Sequence[dict], l1: float, ce_norm: str = "n_examples"
    ) -> None:
        if ce_norm not in CE_NORMS:
            raise ConfigError(f"adapter.ce_norm={ce_norm!r}: must be one of {list(CE_NORMS)}")
        self.model, self.stacks, self.batches, self.l1 = model, stacks, batches, float(l1)
        self.n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
        self.ce_divisor = float(max(self.n_examples, 1)) if ce_norm == "n_examples" else 1.0
        self.history: list[dict] = []
        self._cache: dict[tuple, tuple[float, float]] = {}

    def evaluate(self, w) -> tuple[float, float]:
        """``(L(w), CE̅(w))`` (``CE̅`` the pooled answer-token mean, before the division by ``n``)."""
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        key = tuple(np.float32(w).tolist())
        if key not in self._cache:
            set_composition(self.model, self.stacks, w)
            ce = fewshot_ce(self.model, self.batches)
            reg = self.l1 * float(np.mean(np.abs(w))) if len(w) else 0.0
            self._cache[key] = (ce / self.ce_divisor + reg, ce)
        return self._cache[key]

    def __call__(self, w) -> float:
        loss, ce = self.evaluate(w)
        self.history.append(
            {"eval": len(self.history), "weights": np.asarray(w).tolist(), "loss": loss, "ce": ce}
        )
        return loss


def optimize(objective: Objective, k: int, budget: int, bound: float, optimizer: str, seed: int) -> dict:
    """Run Nevergrad on ``objective`` over ``[-bound, bound]^k`` from 0; returns the best evaluated point
    and Nevergrad's recommendation, each with its objective value."""
    try:
        import nevergrad as ng
    except ImportError as e:  # an optional dependency
        raise ImportError(
            "adapter=lorahub needs nevergrad: pip install 'mtlora[lorahub]' (or pip install nevergrad)"
        ) from e
    if optimizer not in ng.optimizers.registry:
        raise ConfigError(
            f"adapter.optimizer={optimizer!r}: not a Nevergrad optimizer (e.g. NGOpt, CMA, OnePlusOne)"
        )
    zero = np.zeros(k)
    loss0, ce0 = objective.evaluate(zero)  # the base model (B̂ = 0); a candidate, not counted in the budget
    param = ng.p.Array(init=zero, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RHOEND.*")  # scipy's COBYLA, chosen by NGOpt
        for _ in range(budget):
            cand = opt.ask()
            opt.tell(cand, objective(cand.value))
        rec = opt.provide_recommendation()
    best = min(objective.history, key=lambda r: r["loss"])
    if loss0 < best["loss"]:
        best = {"eval": None, "weights": zero.tolist(), "loss": loss0, "ce": ce0}
    rec_w = np.asarray(rec.value, dtype=np.float64).reshape(-1)
    rec_loss, rec_ce = objective.evaluate(rec_w)  # not an optimizer evaluation: kept out of the history
    return {
        "best_evaluated": best,
        "recommendation": {"weights": rec_w.tolist(), "loss": rec_loss, "ce": rec_ce},
        "loss_at_zero": loss0,
        "ce_at_zero": ce0,
        "nevergrad_optimizer": str(getattr(opt, "optim", type(opt).__name__)),
    }


# ------------------------------------------------------------------------------------------------ run


def compose_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Compose the library LoRAs for ``cfg`` into ``run_dir`` (markers and config are the caller's).
    Returns the contents of ``metrics/lorahub.json``."""
    import datasets

    from mtlora.eval.heldin import evaluate_heldin
    from mtlora.eval.outputs import write_heldin
    from mtlora.models import count_parameters
    from mtlora.run.base_model import base_parameters, fingerprint, save_base_model
    from mtlora.run.manifest import write_meta
    from mtlora.run.metrics import JsonlLog, write_csv
    from mtlora.run.tracker import start_tracker
    from mtlora.training.loop import build_model_and_data, generation_suites_at_end

    t0 = time.perf_counter()
    datasets.disable_progress_bars()
    if cfg.hardware.get("num_threads"):
        torch.set_num_threads(int(cfg.hardware.num_threads))
    seed = int(cfg.seed)
    library = preflight_lorahub(cfg)
    modules = sample_modules(library, cfg.adapter.get("num_modules"), seed)
    torch.manual_seed(seed)
    tokenizer, model, data = build_model_and_data(cfg)
    device = torch.device(cfg.hardware.device)
    model.to(device).eval()
    mine = fingerprint(base_parameters(model))
    for d in modules:
        theirs = json.loads((Path(d) / "base_model" / "source.json").read_text()).get("fingerprint_sha256")
        if theirs and theirs != mine:
            raise ConfigError(
                f"LoraHub library run {d}: base_model/source.json fingerprint_sha256={theirs} differs from "
                f"the composition's base model ({mine}): not the same base weights"
            )
    stacks = load_library_weights(model, modules)
    rows = fewshot_rows(data, int(cfg.adapter.fewshot_per_task), seed)
    batches = fewshot_batches(data, rows, int(cfg.eval.batch_size), device)
    ce_norm = str(cfg.adapter.get("ce_norm", "n_examples"))
    choice = str(cfg.adapter.get("result", "recommendation"))
    objective = Objective(model, stacks, batches, float(cfg.adapter.l1), ce_norm)
    log.info(
        "LoraHub: composing %d LoRAs (%s), %d few-shot rows, %s budget %d",
        len(modules),
        ", ".join(str(d) for d in modules),
        sum(len(r) for r in rows.values()),
        cfg.adapter.optimizer,
        int(cfg.adapter.budget),
    )
    tracker = start_tracker(cfg, run_dir)
    ok = False
    try:
        res = optimize(
            objective,
            len(modules),
            int(cfg.adapter.budget),
            float(cfg.adapter.weight_bound),
            str(cfg.adapter.optimizer),
            seed,
        )
        for r in objective.history:
            tracker.log({"lorahub/loss": r["loss"], "lorahub/ce": r["ce"]}, r["eval"])
        best, rec = res["best_evaluated"], res["recommendation"]
        chosen = rec if choice == "recommendation" else best
        set_composition(model, stacks, chosen["weights"])
        names = [str(Path(d).resolve()) for d in modules]
        result = {
            "library": [str(Path(d).resolve()) for d in library],
            "modules": names,
            "result": choice,
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
            "ce_norm": ce_norm,
            "n_examples": objective.n_examples,
            "budget": int(cfg.adapter.budget),
            "optimizer": str(cfg.adapter.optimizer),
            "nevergrad_optimizer": res["nevergrad_optimizer"],
            "weight_bound": float(cfg.adapter.weight_bound),
            "l1": float(cfg.adapter.l1),
            "seed": seed,
            "fewshot_per_task": int(cfg.adapter.fewshot_per_task),
            "fewshot_rows": rows,
            "fewshot_batch_size": int(cfg.eval.batch_size),
            "evaluations": objective.history,
        }
        log.info(
            "LoraHub: loaded the %s, loss %.4f (CE %.4f; base model %.4f) at weights %s; best evaluated "
            "loss %.4f, recommendation loss %.4f",
            choice,
            chosen["loss"],
            chosen["ce"],
            res["ce_at_zero"],
            ", ".join(f"{w:+.3f}" for w in chosen["weights"]),
            best["loss"],
            rec["loss"],
        )
        write_meta(
            run_dir,
            cfg,
            world_size=1,
            parameters=count_parameters(model),
            mixture=data.summary(),
            lorahub={k: result[k] for k in ("modules", "result", "weights", "loss", "budget")},
        )
        save_base_model(cfg.model, model, tokenizer, run_dir / "base_model")
        save_adapter(
            model,
            run_dir / "adapter",
            {
                "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
                "base_model": OmegaConf.to_container(cfg.model, resolve=True),
                "task_names": list(data.task_names),
                "lorahub": {"modules": names, "result": choice, "weights": chosen["weights"]},
            },
        )
        metrics = run_dir / "metrics"
        metrics.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics / "lorahub.json", json.dumps(result, indent=2))
        if cfg.eval.at_end and "heldin" in cfg.eval.suites:
            final = evaluate_heldin(
                model, data, int(cfg.eval.batch_size), cfg.eval.get("max_examples_per_task"), device
            )
            final = {"step": 0, "suite": "heldin", **final}
            JsonlLog(run_dir, "eval").write(final)
            table = [{"task": t, **m} for t, m in final["tasks"].items()]
            write_csv(metrics / "per_task.csv", [{"step": 0, **r} for r in table])
            md = write_heldin(final, run_dir)
            log.info("held-out eval of the composed LoRA:\n%s", md)
            tracker.summary({f"final/{k}": v for k, v in final["macro"].items()})
        tracker.summary(
            {
                "lorahub/loss": chosen["loss"],
                "lorahub/best_evaluated_loss": best["loss"],
                "lorahub/recommendation_loss": rec["loss"],
            }
        )
        generation_suites_at_end(cfg, model, tokenizer, data, run_dir, tracker, 0)  # bbh, heldin_gen, mmlu
        log.info("LoraHub done in %.1f s", time.perf_counter() - t0)
        ok = True
    finally:
        tracker.finish(ok)
    return result
