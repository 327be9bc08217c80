"""Per-forward state shared by every adapter layer of one model.

The training loop sets it before each forward (``context.begin(task_ids=..., capture=...)``); adapter
layers read ``task_ids`` (one id per row, for task-aware adapters), write the output of their
down-projection into ``captured`` when ``capture`` is on (alignment losses, diagnostics) and put
auxiliary losses (router balance) into ``aux_losses``. Model-level terms that look at all layers at
once and run on a schedule (``regularizers``) are called by the loop once per optimizer step; both kinds
enter the step's loss with weight ``1/GA`` (as a term added to a micro-batch loss in an HF Trainer).

The values stay in place until the next ``begin`` so that non-reentrant gradient checkpointing, which
re-runs layer forwards during backward, sees the same task ids as the original forward. Captured tensors
are stored by layer name (a recomputation overwrites, never appends).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: a model-level loss term called once per optimizer step: ``(step, steps_per_epoch) -> loss or None``
StepRegularizer = Callable[[int, int], "torch.Tensor | None"]


@dataclass
class AdapterContext:
    task_ids: torch.Tensor | None = None
    capture: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    #: number of adapter layers in the model (set at injection; for losses averaged over layers)
    num_layers: int = 0
    #: model-level terms (e.g. mtLoRA's spectral regulariser), set at injection, kept across forwards;
    #: the loop adds each one's value / GA to the first micro-batch of every optimizer step
    regularizers: list[StepRegularizer] = field(default_factory=list)

    def begin(self, task_ids: torch.Tensor | None = None, capture: bool = False) -> None:
        """Start a new forward pass: set the row task ids and clear what the last pass left."""
        self.task_ids = task_ids
        self.capture = capture
        self.captured = {}
        self.aux_losses = {}

    def total_aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the layers added in this forward (``None`` when there are none)."""
        if not self.aux_losses:
            return None
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()
