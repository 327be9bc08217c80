"""What every procedure shares: the model and data it runs on, the adapter it saves, the held-in tables it
writes and the generation suites it runs at the end. Paths come from :class:`mtlora.run.layout.RunLayout`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mtlora.adapters import inject_adapters, save_adapter
from mtlora.data import MultiTaskData, build_data
from mtlora.errors import ConfigError
from mtlora.eval.outputs import write_heldin
from mtlora.models import build_model, build_tokenizer
from mtlora.run.layout import RunLayout
from mtlora.run.metrics import write_csv
from mtlora.run.tracker import Tracker
from mtlora.training.compile import compile_decoder_layers, eager_layers

log = logging.getLogger(__name__)


def check_packing(cfg: DictConfig) -> None:
    """Refuse ``data.packing=true`` with what needs one task per row, at run start as validation does
    (:func:`mtlora.config.cross_rules.packing_errors`)."""
    from mtlora.config.cross_rules import packing_errors

    conflicts = packing_errors(cfg)
    if conflicts:
        raise ConfigError("; ".join(conflicts))


def build_model_and_data(cfg: DictConfig):
    """Tokenizer, the task mixture, and the base model with adapters injected (only adapters trainable).

    Packing is checked and the data built first, so that a data problem is reported before any weights are
    loaded."""
    check_packing(cfg)
    tokenizer = build_tokenizer(cfg.model)
    data = build_data(cfg.data, tokenizer, int(cfg.model.max_seq_len))
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    if cfg.train.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_decoder_layers(model, cfg.train.get("compile"))  # train.compile (off by default)
    return tokenizer, model, data


def save_run_adapter(
    cfg: DictConfig, model, run_dir: Path, task_names: Sequence[str], **extra: object
) -> None:
    """``adapter/``: the adapter weights with the adapter and base-model config, the task names (the order
    of the task ids) and ``extra`` keys (e.g. LoraHub's composition weights)."""
    save_adapter(
        model,
        RunLayout(run_dir).adapter,
        {
            "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
            "base_model": OmegaConf.to_container(cfg.model, resolve=True),
            "task_names": list(task_names),
            **extra,
        },
    )


def write_heldin_outputs(run_dir: Path, evals: Sequence[dict], final: dict, tracker: Tracker) -> str | None:
    """``metrics/per_task.csv`` (one row per logged held-in eval and task), the final held-in table
    (``metrics/eval_heldin.*``) and its macro values in the tracker summary; returns the table's markdown
    (None without a final result)."""
    rows = [{"step": r["step"], "task": t, **m} for r in evals for t, m in r["tasks"].items()]
    if rows:
        write_csv(RunLayout(run_dir).per_task_csv, rows)
    if not final:
        return None
    md = write_heldin(final, run_dir)
    tracker.summary({f"final/{k}": v for k, v in final["macro"].items()})
    return md


def generation_suites_at_end(
    cfg, model, tokenizer, data: MultiTaskData, run_dir: Path, tracker: Tracker, step: int
) -> None:
    """The generation suites of ``cfg.eval.suites`` at the end of a run (``eval.at_end``): the held-in samples
    (``eval.samples``), ``bbh``, then ``heldin_gen`` / ``mmlu``; each writes its files into ``run_dir`` and logs
    its headline numbers."""
    if not cfg.eval.at_end:
        return
    from mtlora.eval.suites import SuiteContext, end_of_run_suites, run_suites

    ctx = SuiteContext(
        cfg.eval,
        cfg,
        model,
        tokenizer,
        run_dir,
        data=data,
        task_names=data.task_names,
        tracker=tracker,
        step=step,
    )
    with eager_layers(model):  # train.compile: generation shapes would recompile the training graphs
        run_suites(end_of_run_suites(cfg.eval), ctx)  # held-in samples, bbh, heldin_gen, mmlu
