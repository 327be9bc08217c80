"""LoRA-Split (the HydraLoRA paper's baseline, Tian et al. 2024; ``docs/methods.md`` §1 Table 1, §8).

``k = num_splits`` independent LoRAs of rank ``r/k`` each (``rank`` is the total and must divide evenly):

.. math::
    h = W_0 x + \\sum_{j=1}^{k} m_j(x)\\, s\\, B_j A_j\\, \\mathrm{drop}(x), \\qquad
    s = \\alpha / (r/k) \\;(\\alpha/\\sqrt{r/k} \\text{ with rank-stabilised scaling})

* every split has the scaling of a LoRA of its own rank ``r/k`` (not of the total rank);
* init as LoRA: ``A_j`` kaiming-uniform(a=√5), ``B_j = 0`` (starts equal to the base model);
* ``m_j(x)`` (``split_routing``):

  - ``task`` (default): while the module is **training**, a row of task ``t`` goes through split
    ``assign[t]`` only (``m_j = 1`` for that split, ``0`` otherwise), ``assign = split_of_task`` when given,
    else ``t mod k``. Each split thus learns only from its own task subset — the paper's "k LoRAs trained on
    separate task subsets", in one run. This reads one task id per row from ``context.task_ids`` (a clear
    error when missing). In **eval** mode every ``m_j = 1``: the combined LoRA of the paper, no task ids needed;
  - ``none``: ``m_j = 1`` always (one LoRA of rank ``r`` with block-wise scaling, trained jointly).

* one dropout mask of ``x`` shared by the splits (with ``task`` routing a row reaches only one split, so
  this equals independent masks per split).

Storage and batching: split ``j`` is rows ``[j·r/k, (j+1)·r/k)`` of ``lora_A ∈ R^{r×d_in}`` and the same columns
of ``lora_B ∈ R^{d_out×r}``; the training-time routing is a per-row 0/1 mask on the ``r``-dim down-projection,
so all splits run in one matmul (no loop over splits). Mergeable for eval: ``ΔW = s Σ_j B_j A_j = s B A``.
``capture("lora_A")`` stores the down-projection output the splits actually use (masked in task-routed
training, so that alignment losses also see each row only through its own split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.parallel import LORA_SPLIT


class LoraSplitLinear(AdapterLayer):
    mergeable: ClassVar[bool] = True
    #: task ids are needed in training only (with split_routing=task), not in eval
    needs_task_ids: ClassVar[bool] = False
    method: ClassVar[str] = LORA_SPLIT.name
    spec = LORA_SPLIT

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        num_splits: int | None = None,
        split_routing: str | None = None,
        split_of_task: Sequence[int] | None = None,
    ) -> None:
        """Knobs left ``None`` take the spec's default (:mod:`mtlora.adapters.methods.parallel`); ``split_of_task``
        ``None`` means ``t mod num_splits``."""
        super().__init__(base_layer, name, context)
        if isinstance(split_of_task, ListConfig):
            split_of_task = list(split_of_task)
        v = self.resolve_knobs(
            name, rank=rank, num_splits=num_splits, split_routing=split_routing, split_of_task=split_of_task
        )
        num_splits, split_routing = v["num_splits"], v["split_routing"]
        if split_of_task is not None:
            split_of_task = [int(j) for j in split_of_task]
        self.rank = rank
        self.num_splits = num_splits
        self.split_rank = rank // num_splits
        self.split_routing = split_routing
        self.split_of_task = split_of_task
        self.scaling = lora_scaling(alpha, self.split_rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, f32 = base_layer.weight.device, torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=f32))
        if split_of_task is not None:  # configuration, not state: not saved with the adapter
            assign = torch.tensor(split_of_task, dtype=torch.long, device=dev)
            self.register_buffer("split_assign", assign, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = d_in: the same bound per split
        nn.init.zeros_(self.lora_B)

    @property
    def routes_by_task(self) -> bool:
        """Whether this forward sends each row through its task's split only (task routing, training)."""
        return self.split_routing == "task" and self.training and self.num_splits > 1

    def row_splits(self, x: torch.Tensor) -> torch.Tensor:
        """The split index of every row of ``x`` (``(B,)`` long, on x's device) from ``context.task_ids``."""
        ids = self.context.task_ids
        where = f"{type(self).__name__} (adapter.method={self.method}, layer {self.adapter_name})"
        if ids is None:
            raise ValueError(
                f"{where} with adapter.split_routing=task needs task ids in training: call "
                f"model.adapter_context.begin(task_ids=...) with one task id per row before every training "
                f"forward (or set adapter.split_routing=none)"
            )
        if ids.ndim != 1 or x.ndim < 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"{where}: task ids must have shape (batch,) = ({x.shape[0] if x.ndim >= 2 else '?'},), "
                f"got {tuple(ids.shape)} for an input of shape {tuple(x.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{where}: task ids must be integers, got {ids.dtype}")
        n_known = len(self.split_of_task) if self.split_of_task is not None else None
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or (n_known is not None and hi >= n_known):
                raise ValueError(
                    f"{where}: task ids must lie in [0, {n_known if n_known is not None else 'inf'}) "
                    f"(adapter.split_of_task has one entry per task), got {sorted(set(ids.tolist()))}"
                )
        ids = ids.to(device=x.device, dtype=torch.long)
        if self.split_of_task is None:
            return torch.remainder(ids, self.num_splits)
        return self.split_assign.to(x.device)[ids]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r): every split at once
        if self.routes_by_task:
            split = self.row_splits(x)  # (B,)
            own = torch.arange(self.num_splits, device=x.device) == split.unsqueeze(-1)  # (B, k)
            mask = own.to(z.dtype).repeat_interleave(self.split_rank, dim=-1)  # (B, r)
            z = z * mask.view(x.shape[0], *([1] * (z.ndim - 2)), self.rank)
        self.capture("lora_A", z)
        return F.linear(z, self.lora_B.to(z.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The combined LoRA ``s Σ_j B_j A_j`` (the eval-mode update)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        assign = "t mod k" if self.split_of_task is None else self.split_of_task
        return (
            f"rank={self.rank}, num_splits={self.num_splits} (rank {self.split_rank} each), "
            f"scaling={self.scaling:g}, split_routing={self.split_routing}"
            + (f" (assign {assign})" if self.split_routing == "task" else "")
            + f", dropout={self.dropout_p}"
        )
