"""The alignment term of the training loss, configured by the ``alignment`` group.

Which rows the task statistics are estimated from:

* ``window: micro``: the rows of one micro-batch; the term is added to every micro-batch with weight
  ``λ/GA`` (so ``λ`` times its mean over the step's micro-batches);
* ``window: step``: the rows of all ``GA`` micro-batches of an optimizer step. The term is computed once,
  at the step's last micro-batch, from the representations of all of them, and the step's losses are
  back-propagated together (one backward; the activations of every micro-batch of the step stay alive until
  then, as with a GA× larger micro-batch — combine with gradient checkpointing when memory is tight). Its
  weight is ``λ/GA`` with ``weighting: code`` (the released trainer adds ``λ·R`` once per accumulation cycle
  to one micro-batch loss, and every micro-batch loss is divided by ``GA``) or ``λ`` with
  ``weighting: paper`` (``L = L_LM + λ·R`` per step);
* ``gather: true`` (DDP): the rows of every process are all-gathered (differentiably) before the
  statistics, so each process computes the loss of the global batch; DDP's gradient averaging then gives
  exactly the gradient of that global loss. ``gather: false``: statistics per process (per rank).

How rows form the groups compared pairwise (``grouping``): ``task``, one group per task id; ``released``,
the released trainer's index arithmetic (:func:`mtlora.losses.alignment.released_groups`), whose groups mix
tasks unless the micro-batch size equals ``GA``.

Per-position statistics (``pool: none``) across micro-batches or processes need rows of one length:
``pad_to`` right-pads every row to that many positions before the forward (pad positions then enter the
statistics, as in the released code, which pads every row to 512).

The statistic of ``n`` rows per group: the KL's unbiased variance is ``σ²χ²_{n-1}/(n-1)``, so ``1/σ̂²`` has a
finite mean only for ``n ≥ 4`` and a finite variance only for ``n ≥ 6``; :meth:`AlignmentTerm.check_rows`
refuses a KL whose groups hold fewer than :data:`KL_MIN_ROWS` rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch.distributed.nn.functional import all_gather

from mtlora.errors import ConfigError
from mtlora.losses.alignment import _select_layers, alignment_loss, pool, released_group_ids, released_groups

WINDOWS = ("micro", "step")
GROUPINGS = ("task", "released")
WEIGHTINGS = ("code", "paper")
#: fewest rows a task's KL statistics may come from (variance of 1/σ̂² finite from n = 6 rows)
KL_MIN_ROWS = 6
#: fewest rows any group's statistics may come from (a group of 1 row has no spread)
MIN_ROWS = 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class AlignmentTerm:
    """``weight · L_align`` on the captured down-projection outputs (see
    :func:`mtlora.losses.alignment.alignment_loss`).

    The defaults of the optional fields are the behaviour before these knobs existed (configs saved then
    load unchanged); ``conf/alignment/*.yaml`` set the method defaults."""

    metric: str
    weight: float
    pool: str
    pair_reduce: str
    layer_reduce: str
    layers: Any
    bandwidths: list[float] | None
    window: str = "micro"
    gather: bool = False
    grouping: str = "task"
    weighting: str = "paper"
    pad_to: int | None = None
    backprop: bool = True

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("window", self.window, WINDOWS),
            ("grouping", self.grouping, GROUPINGS),
            ("weighting", self.weighting, WEIGHTINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"alignment.{key}={value!r}: allowed values are {list(allowed)}")
        if self.pad_to is not None and (isinstance(self.pad_to, bool) or int(self.pad_to) < 1):
            raise ConfigError(
                f"alignment.pad_to={self.pad_to!r}: must be null or a positive number of positions"
            )
        if (self.window == "step" or self.gather) and self.pool == "none" and self.pad_to is None:
            raise ConfigError(
                f"alignment.window={self.window}, alignment.gather={self.gather} with alignment.pool=none "
                "compare positions across micro-batches or processes: set alignment.pad_to (rows padded to one "
                "length) or alignment.pool=mean or masked_mean"
            )
        if self.grouping == "released" and self.window != "step":
            raise ConfigError(
                "alignment.grouping=released splits the rows of a whole accumulation window: "
                "set alignment.window=step"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AlignmentTerm | None:
        """None for ``alignment=none`` (nothing is captured then)."""
        if cfg.get("name", "none") == "none":
            return None
        layers = list(cfg.layers) if isinstance(cfg.layers, ListConfig) else cfg.layers
        bw = cfg.get("bandwidths")
        pad_to = cfg.get("pad_to")
        return cls(
            cfg.name,
            float(cfg.weight),
            cfg.pool,
            cfg.pair_reduce,
            cfg.layer_reduce,
            layers,
            list(bw) if bw is not None else None,
            cfg.get("window", "micro"),
            bool(cfg.get("gather", False)),
            cfg.get("grouping", "task"),
            cfg.get("weighting", "paper"),
            int(pad_to) if pad_to is not None else None,
            bool(cfg.get("backprop", True)),
        )

    @property
    def per_micro_batch(self) -> bool:
        """Whether the term is computed on every micro-batch (``window: micro``)."""
        return self.window == "micro"

    def step_weight(self, ga: int) -> float:
        """The weight of the term of a ``window: step`` window in the step's objective:
        ``λ/GA`` (``weighting: code``) or ``λ`` (``weighting: paper``)."""
        return self.weight / ga if self.weighting == "code" else self.weight

    def rows_per_group(self, rows_per_task: int, n_tasks: int, ga: int, processes: int = 1) -> int:
        """Fewest rows any group's statistics come from, for ``rows_per_task`` rows of each of ``n_tasks`` tasks
        per micro-batch, ``ga`` micro-batches per step and ``processes`` processes."""
        window = ga if self.window == "step" else 1
        if self.grouping == "released":
            try:
                groups = released_groups(rows_per_task * n_tasks * window, window, n_tasks)
            except ValueError as e:
                raise ConfigError(
                    f"alignment.grouping=released: {rows_per_task * n_tasks} rows x {window} micro-batches in "
                    f"chunks of train.gradient_accumulation_steps={window} rows give fewer pieces than the "
                    f"{n_tasks} tasks (the released code fails here); set alignment.grouping=task"
                ) from e
            n = min(Counter(groups).values()) if len(set(groups)) == n_tasks else 0
        else:
            n = rows_per_task * window
        return n * (processes if self.gather else 1)

    def check_rows(self, rows_per_task: int, n_tasks: int, ga: int, processes: int = 1) -> None:
        """Refuse a window whose groups hold fewer rows than the metric's floor (KL: :data:`KL_MIN_ROWS`)."""
        n = self.rows_per_group(rows_per_task, n_tasks, ga, processes)
        floor = KL_MIN_ROWS if self.metric == "kl" else MIN_ROWS
        if n >= floor:
            return
        how = (
            f"smallest released group of train.micro_batch_size={rows_per_task * n_tasks} x "
            f"train.gradient_accumulation_steps={ga} rows"
            if self.grouping == "released"
            else f"data.rows_per_task={rows_per_task}"
            + (
                f" x train.gradient_accumulation_steps={ga} (alignment.window=step)"
                if self.window == "step"
                else ""
            )
        )
        if self.gather:
            how += f" x {processes} processes (alignment.gather)"
        why = (
            "the unbiased variance of n rows is σ²χ²_(n-1)/(n-1), and 1/σ̂² has a finite variance only from n=6"
            if self.metric == "kl"
            else "a group of one row has no spread"
        )
        raise ConfigError(
            f"alignment={self.metric}: each group's statistics would come from {n} rows ({how}); at least "
            f"{floor} are needed ({why}): raise train.gradient_accumulation_steps with alignment.window=step, or "
            "train.micro_batch_size"
        )

    def _loss(
        self, captured: Mapping[str, torch.Tensor], task_ids: torch.Tensor, mask, pool_mode: str, layers
    ):
        if not self.backprop:  # computed and logged, no gradient
            captured = {n: z.detach() for n, z in captured.items()}
        return alignment_loss(
            captured,
            task_ids,
            mask,
            metric=self.metric,
            pool_mode=pool_mode,
            pair_reduce=self.pair_reduce,
            layer_reduce=self.layer_reduce,
            layers=layers,
            bandwidths=self.bandwidths,
        )

    def pooled(self, captured: Mapping[str, torch.Tensor], attention_mask: torch.Tensor) -> dict:
        """The selected layers' representations pooled to ``(B, r)`` (``pool: none``: ``(B, S, r)`` as captured),
        for ``window: step`` / ``gather``."""
        names = _select_layers(list(captured), self.layers)
        if not names:
            raise ValueError(f"alignment: no captured layer matches layers={self.layers!r}")
        return {n: pool(captured[n], attention_mask, self.pool) for n in names}

    def group_ids(self, task_ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """The group of every row of a window of micro-batches (one ``(B_i,)`` task-id tensor each)."""
        if self.grouping == "task":
            return torch.cat(list(task_ids))
        n_tasks = len(torch.unique(torch.cat(list(task_ids))))
        try:
            ids = released_group_ids(task_ids, len(task_ids), n_tasks)
        except ValueError as e:
            raise ConfigError(f"alignment.grouping=released: {e}; set alignment.grouping=task") from e
        return ids.to(task_ids[0].device)

    def from_pooled(self, parts: Sequence[dict], task_ids: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The loss over the rows of several micro-batches (and of every process with ``gather``)."""
        reps = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        ids = self.group_ids(task_ids)
        if self.gather and _distributed():
            reps = {n: torch.cat(all_gather(r.contiguous())) for n, r in reps.items()}
            out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
            dist.all_gather(out, ids.contiguous())
            ids = torch.cat(out)
        return self._loss(reps, ids, None, "none", "all")  # already pooled and selected

    def __call__(
        self, captured: Mapping[str, torch.Tensor], task_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The loss of one micro-batch (``window: micro``)."""
        if self.gather:
            return self.from_pooled([self.pooled(captured, attention_mask)], [task_ids])
        return self._loss(captured, task_ids, attention_mask, self.pool, self.layers)


def check_alignment_rows(cfg: DictConfig, rows_per_task: int | None, n_tasks: int) -> None:
    """:meth:`AlignmentTerm.check_rows` for a composed train config (``ConfigError`` when refused)."""
    term = AlignmentTerm.from_config(cfg.alignment)
    if term is None or rows_per_task is None:
        return
    hw = cfg.get("hardware") or {}
    processes = int(hw.get("num_processes") or 1) * int(hw.get("num_machines") or 1)
    term.check_rows(rows_per_task, n_tasks, int(cfg.train.gradient_accumulation_steps), processes)
