"""The alignment term of the training loss, configured by the ``alignment`` group.

Which rows the task statistics are estimated from:

* ``window: micro`` (default, the paper's setting): the rows of one micro-batch; the term is added to
  every micro-batch with weight ``λ/GA``;
* ``window: step``: the rows of all ``GA`` micro-batches of an optimizer step. The term is computed once,
  at the step's last micro-batch, from the pooled representations of all of them, and the step's losses are
  back-propagated together (one backward; the activations of every micro-batch of the step stay alive until
  then, as with a GA× larger micro-batch — combine with gradient checkpointing when memory is tight);
* ``gather: true`` (DDP): the pooled rows of every process are all-gathered (differentiably) before the
  statistics, so each process computes the loss of the global batch; DDP's gradient averaging then gives
  exactly the gradient of that global loss. ``gather: false``: statistics per process (per rank).

``window: step`` and ``gather`` need a pooled representation (``pool: mean|masked_mean``): per-position
statistics (``pool: none``) compare positions, and micro-batches / processes are padded to different lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torch.distributed.nn.functional import all_gather

from mtlora.errors import ConfigError
from mtlora.losses.alignment import _select_layers, alignment_loss, pool

WINDOWS = ("micro", "step")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class AlignmentTerm:
    """``weight · L_align`` on the captured down-projection outputs (see
    :func:`mtlora.losses.alignment.alignment_loss`)."""

    metric: str
    weight: float
    pool: str
    pair_reduce: str
    layer_reduce: str
    layers: Any
    bandwidths: list[float] | None
    window: str = "micro"
    gather: bool = False

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ConfigError(f"alignment.window={self.window!r}: allowed values are {list(WINDOWS)}")
        if (self.window == "step" or self.gather) and self.pool == "none":
            raise ConfigError(
                f"alignment.window={self.window}, alignment.gather={self.gather} pool rows across micro-batches "
                "or processes, which are padded to different lengths: set alignment.pool=mean or masked_mean "
                "(per-position statistics, pool=none, need window=micro and gather=false)"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AlignmentTerm | None:
        """None for ``alignment=none`` (nothing is captured then)."""
        if cfg.get("name", "none") == "none":
            return None
        layers = list(cfg.layers) if isinstance(cfg.layers, ListConfig) else cfg.layers
        bw = cfg.get("bandwidths")
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
        )

    @property
    def per_micro_batch(self) -> bool:
        """Whether the term is computed on every micro-batch (``window: micro``)."""
        return self.window == "micro"

    def _loss(
        self, captured: Mapping[str, torch.Tensor], task_ids: torch.Tensor, mask, pool_mode: str, layers
    ):
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
        """The selected layers' representations pooled to ``(B, r)`` (for ``window: step`` / ``gather``)."""
        names = _select_layers(list(captured), self.layers)
        if not names:
            raise ValueError(f"alignment: no captured layer matches layers={self.layers!r}")
        return {n: pool(captured[n], attention_mask, self.pool) for n in names}

    def from_pooled(self, parts: Sequence[dict], task_ids: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The loss over the rows of several pooled micro-batches (and of every process with ``gather``)."""
        reps = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        ids = torch.cat(list(task_ids))
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
