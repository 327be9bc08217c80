"""The training loop on Accelerate.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches per process. The loss of a
step is the summed answer-token cross-entropy of its micro-batches divided by their total answer-token
count on this process, so each micro-batch weighs by its tokens (not 1/GA); DDP then averages the
processes' gradients. Adapter auxiliary losses (``model.adapter_context.aux_losses``) are added with
weight 1/GA per micro-batch; model-level regularisers (``model.adapter_context.regularizers``) once per
optimizer step, to its first micro-batch, also with weight 1/GA (an HF Trainer adds such a term to one
micro-batch loss and then divides that loss by GA).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtlora.adapters import inject_adapters, save_adapter
from mtlora.data import MultiTaskData, build_data
from mtlora.data.build import rows_per_task
from mtlora.data.mixture import BatchStream
from mtlora.diagnostics import DiagnosticsRunner
from mtlora.diagnostics.heads import save_initial_heads
from mtlora.errors import ConfigError
from mtlora.eval.bbh_suite import run_bbh
from mtlora.eval.bbh_suite import summary_line as bbh_summary_line
from mtlora.eval.heldin import evaluate_heldin
from mtlora.eval.outputs import HELDIN_COLUMNS, write_heldin
from mtlora.losses.causal_lm import causal_lm_loss
from mtlora.models import build_model, build_tokenizer, count_parameters
from mtlora.run.base_model import MAX_SAVED_PARAMS, save_base_model
from mtlora.run.loss_plot import plot_loss
from mtlora.run.manifest import write_meta
from mtlora.run.metrics import JsonlLog, heldin_line, markdown_table, train_csv_rows, train_line, write_csv
from mtlora.run.progress import ProgressBar
from mtlora.run.rundir import WriterLock
from mtlora.run.schedule import resolve_every, schedule_line
from mtlora.run.tracker import Tracker, accelerator_tracking_kwargs, heldin_values, start_tracker
from mtlora.training.alignment_window import AlignmentTerm
from mtlora.training.checkpoint import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from mtlora.training.compile import compile_decoder_layers, eager_layers
from mtlora.training.deepspeed import (
    accelerator_kwargs,
    backward_kwargs,
    defer_main_process_eval,
    eval_on_every_rank,
    micro_batch_context,
    model_build_context,
    unwrap_model,
    uses_deepspeed,
    zero3_gathered,
    zero_stage,
)
from mtlora.training.meta_lora import MetaLearner, average_grads_across_processes
from mtlora.training.watchdog import LossWatchdog
from mtlora.utils.dist import launched_as_worker, require_device

log = logging.getLogger(__name__)


@dataclass
class Interval:
    """Sums over the steps since the last log line (saved in checkpoints so resumed logs match)."""

    steps: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    align_sum: float = 0.0
    aux_sum: float = 0.0  # adapter auxiliary losses (router balance), as added to the step's loss
    reg_sum: float = 0.0  # model-level regularisers (spectral), as added to the step's loss
    task_loss: dict[str, float] = field(default_factory=dict)
    task_tokens: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()


def total_steps(cfg: DictConfig, stream: BatchStream) -> int:
    if cfg.train.max_steps:
        return int(cfg.train.max_steps)
    return max(
        1, math.ceil(cfg.train.epochs * stream.batches_per_epoch / cfg.train.gradient_accumulation_steps)
    )


def make_accelerator(cfg: DictConfig, run_dir: Path | None = None) -> Accelerator:
    require_device(cfg.hardware.device)  # never train on the CPU when a GPU was asked for
    if cfg.hardware.get("num_threads"):
        torch.set_num_threads(int(cfg.hardware.num_threads))
    if not launched_as_worker():
        # Hydra's basic launcher runs the jobs of a multirun in one process, and Accelerate keeps its
        # state process-wide (a second Accelerator with another mixed precision raises). A single-process
        # job owns the process, so it starts from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        **accelerator_kwargs(cfg),  # device, DeepSpeed plugin (mtlora.training.deepspeed)
        **accelerator_tracking_kwargs(cfg.logger, run_dir),  # logger= (mtlora.run.tracker)
    )


def build_model_and_data(cfg: DictConfig):
    """Tokenizer, the task mixture, and the base model with adapters injected (only adapters trainable).

    The data is built first, so that a data problem is reported before any weights are loaded."""
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


def run_training(cfg: DictConfig, run_dir: Path) -> dict:
    """Train ``cfg`` into ``run_dir`` (markers and config are handled by the caller). Returns final eval."""
    datasets.disable_progress_bars()
    acc = make_accelerator(cfg, run_dir)  # several processes: after the rendezvous, so the run dir is claimed
    writer = WriterLock(run_dir) if acc.num_processes > 1 or launched_as_worker() else None
    try:
        return _run_training(cfg, run_dir, acc)
    finally:
        if writer is not None:
            writer.release()


def _run_training(cfg: DictConfig, run_dir: Path, acc: Accelerator) -> dict:
    cfg = defer_main_process_eval(cfg, acc)  # ZeRO-3 over several processes: no generation suites
    torch.manual_seed(int(cfg.seed))
    with model_build_context(acc, cfg.model):  # ZeRO-3: a random-init model is built whole
        tokenizer, model, data = build_model_and_data(cfg)
    if (
        acc.is_main_process
    ):  # the heads' initial values, for the head-similarity increments (whole model here)
        save_initial_heads(model, run_dir)
    params = count_parameters(model)
    per_task = rows_per_task(cfg)
    stream = BatchStream(
        data.schedule, int(cfg.train.micro_batch_size), acc.process_index, acc.num_processes, per_task
    )
    align = AlignmentTerm.from_config(cfg.alignment)
    meta = MetaLearner.from_config(cfg.adapter.get("meta"), seed=int(cfg.seed))
    if meta is not None:
        if align is not None:
            raise ConfigError("adapter.meta and alignment cannot be combined: set alignment=none")
        meta.check_rows(per_task, len(data.task_names))
    if align is not None and per_task:  # statistics from enough rows per group (alignment.window, GA)
        align.check_rows(
            per_task, len(data.task_names), int(cfg.train.gradient_accumulation_steps), acc.num_processes
        )
    steps = total_steps(cfg, stream)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.train.optimizer)(params=trainable)
    scheduler = instantiate(cfg.train.scheduler)(
        optimizer=optimizer,
        num_warmup_steps=int(round(float(cfg.train.warmup_ratio) * steps)),
        num_training_steps=steps,
    )
    model, optimizer = acc.prepare(model, optimizer)
    inner = unwrap_model(acc, model)  # DeepSpeed is imported only when the run uses it
    ctx = inner.adapter_context

    # ZeRO-3: every rank gathers the (small) base model so that the main process saves/fingerprints it whole
    with zero3_gathered(acc, inner.parameters() if params["total"] <= MAX_SAVED_PARAMS else ()):
        if acc.is_main_process:
            save_base_model(cfg.model, inner, tokenizer, run_dir / "base_model")
    if acc.is_main_process:
        log.info(
            "parameters: total %s, trainable %s (%.4f%%)",
            f"{params['total']:,}",
            f"{params['trainable']:,}",
            params["trainable_pct"],
        )
        log.info(
            "mixture (%s, %d examples/epoch):\n%s",
            cfg.data.sampling.strategy,
            data.schedule.epoch_length,
            markdown_table(data.summary(), list(data.summary()[0])),
        )
        write_meta(
            run_dir,
            cfg,
            world_size=acc.num_processes,
            distributed={"type": acc.distributed_type.value, "zero_stage": zero_stage(acc)},
            parameters=params,
            total_steps=steps,
            mixture=data.summary(),
        )
        if per_task:
            log.info(
                "task-balanced batching: every micro-batch holds %d rows of each of the %d tasks "
                "(data.sampling sets only the epoch length)",
                per_task,
                len(data.task_names),
            )

    watchdog = LossWatchdog(
        bool(cfg.train.loss_watchdog.enabled),
        float(cfg.train.loss_watchdog.factor),
        int(cfg.train.loss_watchdog.patience),
    )
    interval = Interval()
    train_log, eval_log = JsonlLog(run_dir, "train"), JsonlLog(run_dir, "eval")
    step, epoch, batch = 0, 0, 0
    ckpt = resolve_resume(cfg.get("resume"), run_dir)
    if ckpt is not None:
        engine = model if uses_deepspeed(acc) else None
        state = load_checkpoint(ckpt, inner, optimizer, scheduler, acc.process_index, engine=engine)
        step, (epoch, batch) = state["step"], state["data_position"]
        watchdog.load_state_dict(state["watchdog"])
        interval = Interval(**state["rank_state"]["interval"])
        if acc.is_main_process:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch)
    elif cfg.get("resume") is not None and acc.is_main_process:
        log.info("resume=%s: no checkpoint found, starting from step 0", cfg.resume)
    if acc.is_main_process:  # records past the restart point (or all, on a fresh start) are redone
        train_log.truncate_after(step)
        eval_log.truncate_after(step)

    tracker = start_tracker(cfg, run_dir, acc, enabled=acc.is_main_process)
    diag = DiagnosticsRunner.for_training(cfg, inner, data, run_dir, tracker, acc.is_main_process, step)
    ga = int(cfg.train.gradient_accumulation_steps)
    steps_per_epoch = max(1, math.ceil(stream.batches_per_epoch / ga))
    loss_cfg = cfg.train.get("loss") or {}  # train.loss.impl: full | chunked (mtlora.losses.causal_lm)
    loss_impl, loss_chunk = loss_cfg.get("impl", "full"), int(loss_cfg.get("chunk_tokens") or 4096)
    batches = stream.iterate(epoch, batch)
    ckpt_every = resolve_every(cfg.train.checkpoint_every, steps, "train.checkpoint_every")
    eval_every = resolve_every(cfg.eval.get("every_steps"), steps, "eval.every_steps")
    if acc.is_main_process:
        heldin = "heldin" in cfg.eval.suites
        log.info(
            "%s", schedule_line(steps, ckpt_every, eval_every if heldin else None, heldin and cfg.eval.at_end)
        )
    bar = ProgressBar(steps, step, "train", disable=not acc.is_main_process)
    t_last, seen_tokens = time.perf_counter(), 0
    final: dict = {}
    ok = False
    try:
        model.train()
        diag.on_start(step)  # init diagnostics (fresh runs), RNG untouched
        while step < steps:
            micro = [next(batches) for _ in range(ga)]
            epoch, batch = micro[-1][0], micro[-1][1] + 1
            pad_to = align.pad_to if align is not None else None  # alignment.pad_to: rows of one length
            tensors = [{k: v.to(acc.device) for k, v in data.batch(m[2], pad_to).items()} for m in micro]
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in tensors)
            # normalise by the answer tokens of the step on all processes: DDP averages gradients over W
            # processes, so each process scales its CE sum by W / n_global to get the global token mean
            n_global = n_tokens
            if acc.num_processes > 1:
                n_global = int(acc.reduce(torch.tensor(n_tokens, device=acc.device), reduction="sum"))
            scale = acc.num_processes / max(n_global, 1)
            step_loss = 0.0
            if meta is not None:  # MeTA-LoRA: inner loops on the unwrapped model, grads averaged by hand
                n_tokens = 0
                for i, b in enumerate(tensors):
                    res = meta.accumulate(inner, b, 1.0 / ga, step, i)
                    step_loss += float(res.ce.sum())
                    n_tokens += int(res.mask.sum())
                    seen_tokens += int(b["attention_mask"].sum())
                    _add_task_losses(interval, data, res.task_ids, res.ce, res.mask)
                average_grads_across_processes(trainable, acc)
            pending, window_reps, window_ids = None, [], []  # alignment.window=step
            for i, b in enumerate(tensors if meta is None else []):
                sync = i == ga - 1
                with micro_batch_context(acc, model, sync):  # no_sync / DeepSpeed's accumulation boundary
                    ctx.begin(task_ids=b["task_ids"], capture=align is not None)
                    ce, mask = causal_lm_loss(model, b, loss_impl, loss_chunk, inner.get_output_embeddings())
                    loss = ce.sum() * scale
                    if align is not None and align.per_micro_batch:
                        a = align(ctx.captured, b["task_ids"], b["attention_mask"])
                        if a is not None:  # averaged over the micro-batches of the step
                            loss = loss + align.weight * a / ga
                            interval.align_sum += float(a.detach()) / ga
                    elif align is not None:  # window=step: pooled rows of every micro-batch, one backward
                        window_reps.append(align.pooled(ctx.captured, b["attention_mask"]))
                        window_ids.append(b["task_ids"])
                    aux = ctx.total_aux_loss()
                    if aux is not None:
                        loss = loss + aux / ga
                        interval.aux_sum += float(aux.detach()) / ga
                    if i == 0:  # model-level regularisers: once per step, on its first micro-batch, ÷ GA
                        for reg in ctx.regularizers:
                            r = reg(step, steps_per_epoch)
                            if r is not None:
                                loss = loss + r / ga
                                interval.reg_sum += float(r.detach()) / ga
                    if align is not None and not align.per_micro_batch:
                        pending = loss if pending is None else pending + loss
                        if sync:
                            a = align.from_pooled(window_reps, window_ids)
                            if a is not None:
                                pending = pending + align.step_weight(ga) * a  # λ/GA (code) or λ (paper)
                                interval.align_sum += float(a.detach())
                            acc.backward(pending, **backward_kwargs(acc))
                    else:
                        acc.backward(loss, **backward_kwargs(acc))
                step_loss += float(ce.detach().sum())
                seen_tokens += int(b["attention_mask"].sum())
                _add_task_losses(interval, data, b.get("token_task_ids", b["task_ids"]), ce.detach(), mask)
            watchdog.check_step(step_loss, step + 1)
            max_norm = cfg.train.max_grad_norm
            grad_norm = acc.clip_grad_norm_(trainable, max_norm) if max_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval.steps += 1
            interval.loss_sum += step_loss
            interval.tokens += n_tokens
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == steps:
                now = time.perf_counter()
                rec = _log_record(
                    acc,
                    interval,
                    step,
                    epoch,
                    scheduler,
                    grad_norm,
                    seen_tokens * acc.num_processes / max(now - t_last, 1e-9),
                )
                watchdog.check_logged(rec["loss"], step)
                if acc.is_main_process:
                    train_log.write(rec)
                    log.info("%s", train_line(rec, steps))
                    tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
                    )
                interval.reset()
                t_last, seen_tokens = time.perf_counter(), 0

            if eval_every and step % eval_every == 0 and step != steps and "heldin" in cfg.eval.suites:
                t_eval = time.perf_counter()
                _evaluate(cfg, acc, inner, data, eval_log, tracker, step)
                t_last += time.perf_counter() - t_eval  # tokens/s counts training time only
            diag.on_step(step, steps)

            if ckpt_every and (step % ckpt_every == 0 or step == steps):
                state = {
                    "step": step,
                    "data_position": [epoch, batch],
                    "watchdog": watchdog.state_dict(),
                    "total_steps": steps,
                }
                save_checkpoint(
                    run_dir / "checkpoints" / f"step_{step}",
                    inner,
                    optimizer,
                    scheduler,
                    state,
                    acc.process_index,
                    acc.is_main_process,
                    acc.wait_for_everyone,
                    rank_state={"interval": interval.__dict__},  # this process's sums since the last log
                    engine=model if uses_deepspeed(acc) else None,
                    gathered=lambda: zero3_gathered(acc, trainable),
                )
                if acc.is_main_process:
                    prune_checkpoints(run_dir, int(cfg.train.keep_checkpoints))
        bar.close()
        if cfg.eval.at_end and "heldin" in cfg.eval.suites:
            final = _evaluate(cfg, acc, inner, data, eval_log, tracker, step, table=True)
        with zero3_gathered(acc, trainable):  # ZeRO-3: every rank gathers the adapter for the save
            if acc.is_main_process:
                _write_outputs(cfg, run_dir, inner, train_log, eval_log, final, tracker)
        if acc.is_main_process:  # after the adapter is saved; main process only
            generation_suites_at_end(cfg, inner, tokenizer, data, run_dir, tracker, step)
        ok = True
    finally:
        bar.close()
        tracker.finish(ok)
        if ok:  # on failure another rank may never arrive; the launcher stops the others
            acc.wait_for_everyone()
        # the DDP wrapper (its reducer holds the process group) goes first, so that end_training's
        # destroy_process_group tears gloo down on every rank; freed later, its destructor can hang (seen once)
        model = None  # noqa: F841
        acc.free_memory()
        acc.end_training()
    return final


def _add_task_losses(interval: Interval, data: MultiTaskData, task_ids, ce, mask) -> None:
    """``task_ids``: one per row ``(B,)``, or one per token ``(B, L)`` for packed rows (data.packing)."""
    if task_ids.dim() == 2:  # per token: position i predicts token i+1, so it counts for that token's task
        task_ids, ce, mask = task_ids[:, 1:].reshape(-1), ce.reshape(-1, 1), mask.reshape(-1, 1)
    per_row_loss = (ce * mask).sum(dim=1)
    per_row_tok = mask.sum(dim=1)
    for t in task_ids.unique().tolist():
        if t < 0:  # padding of packed rows
            continue
        name = data.task_names[t]
        sel = task_ids == t
        interval.task_loss[name] = interval.task_loss.get(name, 0.0) + float(per_row_loss[sel].sum())
        interval.task_tokens[name] = interval.task_tokens.get(name, 0) + int(per_row_tok[sel].sum())


def _log_record(acc: Accelerator, it: Interval, step: int, epoch: int, scheduler, grad_norm, tok_s) -> dict:
    sums = [it.loss_sum, float(it.tokens), it.align_sum, it.aux_sum, it.reg_sum]
    sums = acc.reduce(torch.tensor(sums, device=acc.device, dtype=torch.float64), reduction="sum")
    rec = {
        "step": step,
        "epoch": epoch,
        "loss": float(sums[0] / sums[1].clamp(min=1)),
        "lr": float(scheduler.get_last_lr()[0]),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": round(tok_s, 1),
    }
    # per step, mean over steps and processes, logged when the run has the term: align_loss = the alignment
    # term before its weight; aux_loss (adapter auxiliary losses) and reg_loss (model-level regularisers) =
    # what was added to the loss, their weights included
    per_step = max(it.steps * acc.num_processes, 1)
    for key, i, value in (
        ("align_loss", 2, it.align_sum),
        ("aux_loss", 3, it.aux_sum),
        ("reg_loss", 4, it.reg_sum),
    ):
        if value:
            rec[key] = float(sums[i]) / per_step
    # per-task loss on this process's rows (rank 0's view under DDP)
    rec["task_loss"] = {k: it.task_loss[k] / max(it.task_tokens[k], 1) for k in sorted(it.task_loss)}
    if torch.cuda.is_available():
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return rec


def _evaluate(cfg, acc, inner, data, eval_log: JsonlLog, tracker: Tracker, step: int, table=False) -> dict:
    """The ``heldin`` suite on the main process (under multi-rank ZeRO-3 on every rank, in lockstep); logs
    one line (``table``: the per-task table)."""
    result: dict = {}
    if acc.is_main_process or eval_on_every_rank(acc):
        result = evaluate_heldin(
            inner, data, int(cfg.eval.batch_size), cfg.eval.get("max_examples_per_task"), acc.device
        )
    if acc.is_main_process:
        result = {"step": step, "suite": "heldin", **result}
        eval_log.write(result)
        tracker.log(heldin_values(result), step)
        rows = [{"task": t, **m} for t, m in result["tasks"].items()]
        rows.append({"task": "macro", "n": sum(r["n"] for r in rows), **result["macro"]})
        if table:
            log.info(
                "held-out eval at step %d:\n%s",
                step,
                markdown_table(rows, HELDIN_COLUMNS),
            )
        else:
            log.info("held-out eval at step %d: %s", step, heldin_line(result))
    acc.wait_for_everyone()
    return result


def generation_suites_at_end(
    cfg, model, tokenizer, data: MultiTaskData, run_dir: Path, tracker: Tracker, step: int
) -> None:
    """The generation suites of ``cfg.eval.suites`` at the end of a run (``eval.at_end``): the held-in samples
    (``eval.samples``), ``bbh``, then ``heldin_gen`` / ``mmlu``; each writes its files into ``run_dir`` and logs
    its headline numbers."""
    if not cfg.eval.at_end:
        return
    with eager_layers(model):  # train.compile: generation shapes would recompile the training graphs
        if cfg.eval.get("samples"):  # a few generations per task to look at (mtlora.eval.samples)
            from mtlora.eval.samples import write_heldin_samples

            write_heldin_samples(model, tokenizer, data, cfg.data, cfg.eval.samples, run_dir)
        if "bbh" in cfg.eval.suites:
            _evaluate_bbh(cfg, model, tokenizer, data, run_dir, tracker, step)
        if {"heldin_gen", "mmlu"} & set(cfg.eval.suites):
            from mtlora.eval.heldin_gen import run_generation_suites

            run_generation_suites(
                cfg.eval, cfg, model, tokenizer, run_dir, data, data.task_names, tracker, step
            )


def _evaluate_bbh(cfg, inner, tokenizer, data: MultiTaskData, run_dir: Path, tracker: Tracker, step: int):
    """The ``bbh`` suite on the trained model (mtlora.eval.bbh_suite); writes its files into ``run_dir``."""
    result = run_bbh(inner, tokenizer, cfg.eval.bbh, run_dir, task_names=data.task_names)
    key = f"bbh_{result['protocol']}"
    tracker.log(
        {f"eval/{key}/macro": result["macro"]["accuracy"], f"eval/{key}/micro": result["micro"]["accuracy"]},
        step,
    )
    tracker.summary(
        {f"final/{key}/macro": result["macro"]["accuracy"], f"final/{key}/micro": result["micro"]["accuracy"]}
    )
    log.info("%s (tables in metrics/eval_%s.md)", bbh_summary_line(result), key)
    return result


def _write_outputs(
    cfg, run_dir: Path, inner, train_log: JsonlLog, eval_log: JsonlLog, final: dict, tracker: Tracker
) -> None:
    if cfg.train.save_adapter:
        save_adapter(
            inner,
            run_dir / "adapter",
            {
                "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
                "base_model": OmegaConf.to_container(cfg.model, resolve=True),
                "task_names": list(cfg.data.get("select") or cfg.data.tasks),
            },
        )
    evals = eval_log.read()
    rows = [{"step": r["step"], "task": t, **m} for r in evals for t, m in r["tasks"].items()]
    if rows:
        write_csv(run_dir / "metrics" / "per_task.csv", rows)
    if final:
        write_heldin(final, run_dir)
        tracker.summary({f"final/{k}": v for k, v in final["macro"].items()})
    train = train_log.read()
    if cfg.logger.name == "csv" and train:
        write_csv(run_dir / "metrics" / "train.csv", train_csv_rows(train))
    plot_loss(train, evals, run_dir / "plots" / "loss.png", title=str(cfg.run_name))
