"""MOELoRA (Liu et al., 2023; ``docs/methods.md`` §8): LoRA experts with a task-embedding gate.

For a row of task ``t``:

.. math::
    h = W_0 x + s \\sum_{i=1}^{E} \\omega_i(t)\\, B_i A_i\\, \\mathrm{drop}_i(x), \\qquad
    \\omega(t) = \\mathrm{softmax}(W_g\\, \\mathrm{Emb}[t])

* ``E = num_experts`` experts of rank ``r/E`` each (``rank`` is the total; must divide evenly): ``A_i`` are
  the row blocks of ``lora_A ∈ R^{r×d_in}`` (``N(0, 0.01²)``), ``B_i`` the column blocks of
  ``lora_B ∈ R^{d_out×r}`` (zeros), so every expert runs in one matmul;
* ``drop_i`` (``dropout_place``): ``input_per_head`` — an independent dropout mask of the input per expert
  (the official MOELoRA and MTL-LoRA code call the dropout inside their expert loop); ``input_shared`` — one
  mask for all experts (mtLoRA's copy of MOELoRA);
* the gate reads the task, not the token: a per-layer task embedding ``Emb`` (``lora_task_embedding``,
  ``N(0, 1)`` as nn.Embedding) and a bias-free ``W_g ∈ R^{E×task_embed_dim}`` (``lora_gate``,
  kaiming-uniform(a=√5) as nn.Linear), gate logits and softmax in fp32. ``Emb`` has ``T + 1`` rows
  (``task_embedding_rows=tasks_plus_one``, as every released MOELoRA) or ``T`` (``tasks``); task ``t`` reads
  row ``t`` (``0 ≤ t < T``), so the extra row ``T`` is never read and never trained;
* ``s = α/r`` over the total rank (``α/√r`` with ``use_rslora``).

Each row uses its own task id (``context.task_ids``, required in train and eval). Not mergeable for all
tasks at once; merged per task: ``merge(task_id=t)`` folds ``ΔW_t = s Σ_i ω_i(t) B_i A_i``
(:meth:`merged_delta_weight`) into the base weight, after which the layer serves rows of task ``t`` only
(:class:`~mtlora.adapters.task_aware.TaskAwareLayer`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.task_aware import MOELORA
from mtlora.adapters.task_aware import TaskAwareLayer


class MoeLoraLinear(TaskAwareLayer):
    method: ClassVar[str] = MOELORA.name
    spec = MOELORA

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        context: AdapterContext,
        rank: int,
        alpha: float,
        num_tasks: int,
        dropout: float = 0.0,
        use_rslora: bool = False,
        num_experts: int | None = None,
        task_embed_dim: int | None = None,
        dropout_place: str | None = None,
        task_embedding_rows: str | None = None,
    ) -> None:
        super().__init__(base_layer, name, context)
        v = self.resolve_knobs(
            name,
            rank=rank,
            num_tasks=num_tasks,
            num_experts=num_experts,
            task_embed_dim=task_embed_dim,
            dropout_place=dropout_place,
            task_embedding_rows=task_embedding_rows,
        )
        num_experts, task_embed_dim = v["num_experts"], v["task_embed_dim"]
        dropout_place, rows = v["dropout_place"], v["task_embedding_rows"]
        self.rank = rank
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.expert_rank = rank // num_experts
        self.task_embed_dim = task_embed_dim
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_place = dropout_place
        self.task_embedding_rows = rows
        n_rows = num_tasks + 1 if rows == "tasks_plus_one" else num_tasks
        dev = base_layer.weight.device
        f32 = torch.float32
        # expert i = rows [i·r_e, (i+1)·r_e) of A and the same columns of B
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=f32))
        self.lora_task_embedding = nn.Parameter(torch.empty(n_rows, task_embed_dim, device=dev, dtype=f32))
        self.lora_gate = nn.Parameter(torch.empty(num_experts, task_embed_dim, device=dev, dtype=f32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.normal_(self.lora_A, 0.0, 0.01)
        nn.init.zeros_(self.lora_B)
        nn.init.normal_(self.lora_task_embedding, 0.0, 1.0)
        nn.init.kaiming_uniform_(self.lora_gate, a=math.sqrt(5))

    def up_heads(self) -> torch.Tensor:
        """Expert ``i``'s ``B_i`` = columns ``[i·r_e, (i+1)·r_e)`` of ``lora_B``, as ``(E, d_out, r_e)``."""
        return self.lora_B.view(self.out_features, self.num_experts, self.expert_rank).permute(1, 0, 2)

    def gate_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``softmax(W_g Emb[t])`` per id, ``(len(ids), E)``, fp32 (autocast off)."""
        with torch.autocast(device_type=self.lora_gate.device.type, enabled=False):
            emb = self.lora_task_embedding.float()[task_ids]
            return torch.softmax(F.linear(emb, self.lora_gate.float()), dim=-1)

    def _expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``z = [A_1 drop_1(x), …, A_E drop_E(x)]`` as ``(..., r)`` (expert ``i`` = block ``i`` of ``r/E``)."""
        a = self.lora_A.to(x.dtype)
        if self.dropout_place == "input_per_head" and self.training and self.dropout_p > 0:
            e, r_e = self.num_experts, self.expert_rank
            xs = self.lora_dropout(x.unsqueeze(-2).expand(*x.shape[:-1], e, x.shape[-1]))  # (..., E, d_in)
            z = torch.einsum("...ed,erd->...er", xs, a.view(e, r_e, -1)).flatten(-2)
            if self.context.capture:
                self.capture("lora_A", F.linear(x, a))
            return z
        z = F.linear(self.lora_dropout(x), a)  # (..., r): all experts at once, one mask
        self.capture("lora_A", z)
        return z

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.row_task_ids(x)
        z = self._expert_inputs(x)
        w = self.gate_weights(ids).to(z.dtype).repeat_interleave(self.expert_rank, dim=-1)  # (B, r)
        w = w.view(x.shape[0], *([1] * (z.ndim - 2)), self.rank)
        return F.linear(z * w, self.lora_B.to(z.dtype)) * self.scaling

    def merged_delta_weight(self, task_id: int) -> torch.Tensor:
        t = self._task_id(task_id)
        w = self.gate_weights(torch.tensor([t], device=self.lora_gate.device))[0]
        w = w.repeat_interleave(self.expert_rank)
        return self.scaling * ((self.lora_B.float() * w) @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_tasks={self.num_tasks}, num_experts={self.num_experts} "
            f"(rank {self.expert_rank} each), task_embed_dim={self.task_embed_dim}, "
            f"scaling={self.scaling:g}, dropout={self.dropout_p}@{self.dropout_place}, "
            f"embedding rows={self.lora_task_embedding.shape[0]}"
        )
