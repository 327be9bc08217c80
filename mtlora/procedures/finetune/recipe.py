r"""Gradient fine-tuning on Accelerate, as a recipe: :meth:`FinetuneRecipe.setup`, :meth:`~FinetuneRecipe.train`,
:meth:`~FinetuneRecipe.save`, :meth:`~FinetuneRecipe.cleanup` over the components of :mod:`mtlora.training`
(checkpoints, DeepSpeed, compile, loss watchdog) and :mod:`mtlora.procedures.common`.

One optimizer step consumes ``gradient_accumulation_steps`` (:math:`GA`) micro-batches per process; what it
does with them is the step strategy chosen at setup (:mod:`.steps`). The loss of a step is the summed
answer-token cross-entropy of its micro-batches divided by their total answer-token count,

.. math::

    L = \frac{1}{N} \sum_{i=1}^{GA} \sum_{t \in b_i} \mathrm{CE}_t,

so each micro-batch weighs by its tokens (not :math:`1/GA`); DDP then averages the processes' gradients.
Adapter auxiliary losses are added with weight :math:`1/GA` per micro-batch, model-level regularisers once
per optimizer step, to its first micro-batch, also with weight :math:`1/GA` (an HF Trainer adds such a term
to one micro-batch loss and then divides that loss by :math:`GA`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtlora.data.batching import rows_per_task
from mtlora.data.mixture import BatchStream
from mtlora.diagnostics import DiagnosticsRunner
from mtlora.diagnostics.heads import save_initial_heads
from mtlora.eval.heldin import evaluate_heldin
from mtlora.eval.outputs import HELDIN_COLUMNS
from mtlora.models import count_parameters
from mtlora.procedures.common import (
    build_model_and_data,
    generation_suites_at_end,
    save_run_adapter,
    write_heldin_outputs,
)
from mtlora.procedures.finetune.records import Interval, log_record
from mtlora.procedures.finetune.steps import StepEnv, choose_step
from mtlora.run.base_model import MAX_SAVED_PARAMS, save_base_model
from mtlora.run.layout import RunLayout
from mtlora.run.loss_plot import plot_loss
from mtlora.run.manifest import write_meta
from mtlora.run.metrics import JsonlLog, heldin_line, markdown_table, train_csv_rows, train_line, write_csv
from mtlora.run.progress import ProgressBar
from mtlora.run.rundir import WriterLock
from mtlora.run.schedule import resolve_every, schedule_line
from mtlora.run.tracker import accelerator_tracking_kwargs, heldin_values, start_tracker
from mtlora.training.checkpoint import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from mtlora.training.deepspeed import (
    accelerator_kwargs,
    defer_main_process_eval,
    eval_on_every_rank,
    model_build_context,
    unwrap_model,
    uses_deepspeed,
    zero3_gathered,
    zero_stage,
)
from mtlora.training.watchdog import LossWatchdog
from mtlora.utils.dist import launched_as_worker, require_device

log = logging.getLogger(__name__)


def total_steps(cfg: DictConfig, stream: BatchStream) -> int:
    """``train.max_steps``, else :math:`\\lceil epochs \\cdot batches/epoch / GA \\rceil` (at least 1)."""
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


def run_training(cfg: DictConfig, run_dir: Path) -> dict:
    """Train ``cfg`` into ``run_dir`` (markers and config are handled by the caller). Returns final eval."""
    return FinetuneRecipe(cfg, run_dir).run()


class FinetuneRecipe:
    """One fine-tuning run of ``cfg`` into ``run_dir`` (the ``finetune`` procedure)."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir, self.layout = cfg, Path(run_dir), RunLayout(run_dir)

    def run(self) -> dict:
        """setup, train, save, cleanup; returns the final held-in result (``{}`` without one)."""
        datasets.disable_progress_bars()
        # several processes: after the rendezvous, so the run dir is claimed
        self.acc = make_accelerator(self.cfg, self.run_dir)
        multi = self.acc.num_processes > 1 or launched_as_worker()
        writer = WriterLock(self.run_dir) if multi else None
        try:
            self.setup()
            ok = False
            try:
                self.train()
                final = self.save()
                ok = True
            finally:
                self.cleanup(ok)
            return final
        finally:
            if writer is not None:
                writer.release()

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Model and data, step strategy, optimizer, run records, resume state, then the loop's helpers."""
        self._setup_model()
        self._setup_optimization()
        self._record_run()
        self._setup_state()
        self._setup_loop()

    def _setup_model(self) -> None:
        acc = self.acc
        cfg = self.cfg = defer_main_process_eval(
            self.cfg, acc
        )  # ZeRO-3 over several processes: no gen suites
        torch.manual_seed(int(cfg.seed))
        with model_build_context(acc, cfg.model):  # ZeRO-3: a random-init model is built whole
            self.tokenizer, self.model, self.data = build_model_and_data(cfg)
        if acc.is_main_process:  # the heads' initial values, for the head-similarity increments (whole model)
            save_initial_heads(self.model, self.run_dir)
        self.params = count_parameters(self.model)
        self.per_task = rows_per_task(cfg)
        self.stream = BatchStream(
            self.data.schedule,
            int(cfg.train.micro_batch_size),
            acc.process_index,
            acc.num_processes,
            self.per_task,
        )
        self.step_fn = choose_step(cfg, self.per_task, len(self.data.task_names), acc.num_processes)

    def _setup_optimization(self) -> None:
        cfg = self.cfg
        self.steps = steps = total_steps(cfg, self.stream)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = instantiate(cfg.train.optimizer)(params=self.trainable)
        self.scheduler = instantiate(cfg.train.scheduler)(
            optimizer=optimizer,
            num_warmup_steps=int(round(float(cfg.train.warmup_ratio) * steps)),
            num_training_steps=steps,
        )
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.inner = unwrap_model(self.acc, self.model)  # DeepSpeed is imported only when the run uses it

    def _record_run(self) -> None:
        """``base_model/``, the parameter and mixture log lines, and ``meta.json``'s run facts."""
        acc, cfg, data, params = self.acc, self.cfg, self.data, self.params
        # ZeRO-3: every rank gathers the (small) base model so that the main process saves/fingerprints it whole
        with zero3_gathered(acc, self.inner.parameters() if params["total"] <= MAX_SAVED_PARAMS else ()):
            if acc.is_main_process:
                save_base_model(cfg.model, self.inner, self.tokenizer, self.layout.base_model)
        if not acc.is_main_process:
            return
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
            self.run_dir,
            cfg,
            world_size=acc.num_processes,
            distributed={"type": acc.distributed_type.value, "zero_stage": zero_stage(acc)},
            parameters=params,
            total_steps=self.steps,
            mixture=data.summary(),
        )
        if self.per_task:
            log.info(
                "task-balanced batching: every micro-batch holds %d rows of each of the %d tasks "
                "(data.sampling sets only the epoch length)",
                self.per_task,
                len(data.task_names),
            )

    def _setup_state(self) -> None:
        """Loss watchdog, log sums and data position: fresh, or from the checkpoint ``resume`` names."""
        acc, cfg = self.acc, self.cfg
        wd = cfg.train.loss_watchdog
        self.watchdog = LossWatchdog(bool(wd.enabled), float(wd.factor), int(wd.patience))
        self.interval = Interval()
        self.train_log, self.eval_log = JsonlLog(self.run_dir, "train"), JsonlLog(self.run_dir, "eval")
        self.step, self.epoch, self.batch = 0, 0, 0
        ckpt = resolve_resume(cfg.get("resume"), self.run_dir)
        if ckpt is not None:
            engine = self.model if uses_deepspeed(acc) else None
            state = load_checkpoint(
                ckpt, self.inner, self.optimizer, self.scheduler, acc.process_index, engine=engine
            )
            self.step, (self.epoch, self.batch) = state["step"], state["data_position"]
            self.watchdog.load_state_dict(state["watchdog"])
            self.interval = Interval(**state["rank_state"]["interval"])
            if acc.is_main_process:
                log.info(
                    "resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.step, self.epoch, self.batch
                )
        elif cfg.get("resume") is not None and acc.is_main_process:
            log.info("resume=%s: no checkpoint found, starting from step 0", cfg.resume)
        if acc.is_main_process:  # records past the restart point (or all, on a fresh start) are redone
            self.train_log.truncate_after(self.step)
            self.eval_log.truncate_after(self.step)

    def _setup_loop(self) -> None:
        """Tracker, diagnostics, the step's environment, the batch iterator and the log/eval/save schedule."""
        acc, cfg, steps = self.acc, self.cfg, self.steps
        self.tracker = start_tracker(cfg, self.run_dir, acc, enabled=acc.is_main_process)
        self.diag = DiagnosticsRunner.for_training(
            cfg, self.inner, self.data, self.run_dir, self.tracker, acc.is_main_process, self.step
        )
        ga = int(cfg.train.gradient_accumulation_steps)
        loss_cfg = cfg.train.get("loss") or {}  # train.loss.impl: full | chunked (mtlora.losses.causal_lm)
        self.env = StepEnv(
            acc=acc,
            model=self.model,
            inner=self.inner,
            trainable=self.trainable,
            data=self.data,
            interval=self.interval,
            ga=ga,
            steps_per_epoch=max(1, math.ceil(self.stream.batches_per_epoch / ga)),
            loss_impl=loss_cfg.get("impl", "full"),
            loss_chunk=int(loss_cfg.get("chunk_tokens") or 4096),
        )
        self.batches = self.stream.iterate(self.epoch, self.batch)
        self.ckpt_every = resolve_every(cfg.train.checkpoint_every, steps, "train.checkpoint_every")
        self.eval_every = resolve_every(cfg.eval.get("every_steps"), steps, "eval.every_steps")
        if acc.is_main_process:
            heldin = "heldin" in cfg.eval.suites
            every = self.eval_every if heldin else None
            log.info("%s", schedule_line(steps, self.ckpt_every, every, heldin and cfg.eval.at_end))
        self.bar = ProgressBar(steps, self.step, "train", disable=not acc.is_main_process)
        self.t_last, self.seen_tokens = time.perf_counter(), 0

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """Optimizer steps until ``total_steps``, each followed by its logging, eval, diagnostics, checkpoint."""
        self.model.train()
        self.diag.on_start(self.step)  # init diagnostics (fresh runs), RNG untouched
        while self.step < self.steps:
            grad_norm = self.train_step()
            self.log_step(grad_norm)
            self.eval_step()
            self.diag.on_step(self.step, self.steps)
            self.checkpoint_step()
        self.bar.close()

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step: its micro-batches through the step strategy, then clip, step, zero the
        gradients. Returns the gradient norm before clipping (None without ``train.max_grad_norm``)."""
        acc, env = self.acc, self.env
        micro = [next(self.batches) for _ in range(env.ga)]
        self.epoch, self.batch = micro[-1][0], micro[-1][1] + 1
        pad_to = self.step_fn.pad_to  # alignment.pad_to: rows of one length
        tensors = [{k: v.to(acc.device) for k, v in self.data.batch(m[2], pad_to).items()} for m in micro]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in tensors)
        # normalise by the answer tokens of the step on all processes: DDP averages gradients over W
        # processes, so each process scales its CE sum by W / n_global to get the global token mean
        n_global = n_tokens
        if acc.num_processes > 1:
            n_global = int(acc.reduce(torch.tensor(n_tokens, device=acc.device), reduction="sum"))
        scale = acc.num_processes / max(n_global, 1)
        totals = self.step_fn.run(env, self.step, tensors, scale, n_tokens)
        self.seen_tokens += totals.seen
        self.watchdog.check_step(totals.loss, self.step + 1)
        max_norm = self.cfg.train.max_grad_norm
        grad_norm = acc.clip_grad_norm_(self.trainable, max_norm) if max_norm else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.interval.steps += 1
        self.interval.loss_sum += totals.loss
        self.interval.tokens += totals.tokens
        self.bar.update(1)
        return grad_norm

    def log_step(self, grad_norm) -> None:
        """Every ``train.log_every`` steps and at the last: one ``train.jsonl`` record of the interval."""
        acc, step = self.acc, self.step
        if not (step % self.cfg.train.log_every == 0 or step == self.steps):
            return
        now = time.perf_counter()
        tok_s = self.seen_tokens * acc.num_processes / max(now - self.t_last, 1e-9)
        rec = log_record(acc, self.interval, step, self.epoch, self.scheduler, grad_norm, tok_s)
        self.watchdog.check_logged(rec["loss"], step)
        if acc.is_main_process:
            self.train_log.write(rec)
            log.info("%s", train_line(rec, self.steps))
            self.tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step)
            self.bar.set_postfix(
                loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
            )
        self.interval.reset()
        self.t_last, self.seen_tokens = time.perf_counter(), 0

    def eval_step(self) -> None:
        """Every ``eval.every_steps`` steps (not the last): the held-in suite."""
        step = self.step
        if (
            self.eval_every
            and step % self.eval_every == 0
            and step != self.steps
            and "heldin" in self.cfg.eval.suites
        ):
            t_eval = time.perf_counter()
            self.heldin_eval()
            self.t_last += time.perf_counter() - t_eval  # tokens/s counts training time only

    def checkpoint_step(self) -> None:
        """Every ``train.checkpoint_every`` steps and at the last: ``checkpoints/step_<N>/``, then pruning."""
        acc, step = self.acc, self.step
        if not (self.ckpt_every and (step % self.ckpt_every == 0 or step == self.steps)):
            return
        state = {
            "step": step,
            "data_position": [self.epoch, self.batch],
            "watchdog": self.watchdog.state_dict(),
            "total_steps": self.steps,
        }
        save_checkpoint(
            self.layout.checkpoint(step),
            self.inner,
            self.optimizer,
            self.scheduler,
            state,
            acc.process_index,
            acc.is_main_process,
            acc.wait_for_everyone,
            rank_state={"interval": self.interval.__dict__},  # this process's sums since the last log
            engine=self.model if uses_deepspeed(acc) else None,
            gathered=lambda: zero3_gathered(acc, self.trainable),
        )
        if acc.is_main_process:
            prune_checkpoints(self.run_dir, int(self.cfg.train.keep_checkpoints))

    def heldin_eval(self, table: bool = False) -> dict:
        """The ``heldin`` suite on the main process (under multi-rank ZeRO-3 on every rank, in lockstep); logs
        one line (``table``: the per-task table)."""
        acc, cfg, step = self.acc, self.cfg, self.step
        result: dict = {}
        if acc.is_main_process or eval_on_every_rank(acc):
            result = evaluate_heldin(
                self.inner,
                self.data,
                int(cfg.eval.batch_size),
                cfg.eval.get("max_examples_per_task"),
                acc.device,
            )
        if acc.is_main_process:
            result = {"step": step, "suite": "heldin", **result}
            self.eval_log.write(result)
            self.tracker.log(heldin_values(result), step)
            rows = [{"task": t, **m} for t, m in result["tasks"].items()]
            rows.append({"task": "macro", "n": sum(r["n"] for r in rows), **result["macro"]})
            if table:
                log.info("held-out eval at step %d:\n%s", step, markdown_table(rows, HELDIN_COLUMNS))
            else:
                log.info("held-out eval at step %d: %s", step, heldin_line(result))
        acc.wait_for_everyone()
        return result

    # ------------------------------------------------------------------------------------------- save
    def save(self) -> dict:
        """Final held-in eval (``eval.at_end``), the outputs, then the end-of-run generation suites."""
        acc, cfg = self.acc, self.cfg
        final: dict = {}
        if cfg.eval.at_end and "heldin" in cfg.eval.suites:
            final = self.heldin_eval(table=True)
        with zero3_gathered(acc, self.trainable):  # ZeRO-3: every rank gathers the adapter for the save
            if acc.is_main_process:
                self.write_outputs(final)
        if acc.is_main_process:  # after the adapter is saved; main process only
            generation_suites_at_end(
                cfg, self.inner, self.tokenizer, self.data, self.run_dir, self.tracker, self.step
            )
        return final

    def write_outputs(self, final: dict) -> None:
        """``adapter/`` (``train.save_adapter``), the held-in tables, ``metrics/train.csv`` (csv logger) and
        ``plots/loss.png``."""
        cfg, layout = self.cfg, self.layout
        if cfg.train.save_adapter:
            save_run_adapter(cfg, self.inner, self.run_dir, cfg.data.get("select") or cfg.data.tasks)
        evals = self.eval_log.read()
        write_heldin_outputs(self.run_dir, evals, final, self.tracker)
        train = self.train_log.read()
        if cfg.logger.name == "csv" and train:
            write_csv(layout.train_csv, train_csv_rows(train))
        plot_loss(train, evals, layout.loss_plot, title=str(cfg.run_name))

    # ---------------------------------------------------------------------------------------- cleanup
    def cleanup(self, ok: bool) -> None:
        """Close the bar and tracker, wait for the other ranks (on success), release the model and end
        Accelerate's process group."""
        self.bar.close()
        self.tracker.finish(ok)
        if ok:  # on failure another rank may never arrive; the launcher stops the others
            self.acc.wait_for_everyone()
        # the DDP wrapper (its reducer holds the process group) goes first, so that end_training's
        # destroy_process_group tears gloo down on every rank; freed later, its destructor can hang (seen once)
        self.model = self.env = None
        self.acc.free_memory()
        self.acc.end_training()
