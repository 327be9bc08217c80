"""MOELoRA (Liu et al., 2023; ``docs/methods.md`` §8): LoRA experts with a task-embedding gate.

For a row of task ``t``:

.. math::
    h = W_0 x + s \\sum_{i=1}^{E} \\omega_i(t)\\, B_i A_i\\, \\mathrm{drop}(x), \\qquad
    \\omega(t) = \\mathrm{softmax}(W_g\\, \\mathrm{Emb}[t])

* ``E = num_experts`` experts of rank ``r/E`` each (``rank`` is the total; must divide evenly): ``A_i`` are
  the row blocks of ``lora_A ∈ R^{r×d_in}`` (``N(0, 0.01²)``), ``B_i`` the column blocks of
  ``lora_B ∈ R^{d_out×r}`` (zeros), so every expert runs in one matmul;
* the gate reads the task, not the token: a per-layer task embedding ``Emb ∈ R^{T×task_embed_dim}``
  (``lora_task_embedding``, ``N(0, 1)`` as nn.Embedding) and a bias-free ``W_g ∈ R^{E×task_embed_dim}``
  (``lora_gate``, kaiming-uniform(a=√5) as nn.Linear), gate logits and softmax in fp32;
* ``s = α/r`` over the total rank (``α/√r`` with ``use_rslora``).

Each row uses its own task id (``context.task_ids``, required in train and eval). Not mergeable for all
tasks at once; merged per task: ``merge(task_id=t)`` folds ``ΔW_t = s Σ_i ω_i(t) B_i A_i``
(:meth:`merged_delta_weight`) into the base weight, after which the layer serves rows of task ``t`` only
(:class:`~mtlora.adapters.mtl_lora.TaskAwareLayer`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.base import check_arg, is_int
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.mtl_lora import TaskAwareLayer


class MoeLoraLinear(TaskAwareLayer):
    method: ClassVar[str] = "moelora"
    required_keys: ClassVar[tuple[str, ...]] = ("num_tasks",)
    defaults: ClassVar[dict] = {"num_experts": 4, "task_embed_dim": 64}

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
    ) -> None:
        super().__init__(base_layer, name, context)
        d = self.defaults
        num_experts = d["num_experts"] if num_experts is None else num_experts
        task_embed_dim = d["task_embed_dim"] if task_embed_dim is None else task_embed_dim
        check_arg(name, "rank", rank, is_int(rank, 1), "an integer >= 1")
        check_arg(name, "num_tasks", num_tasks, is_int(num_tasks, 1), "an integer >= 1")
        check_arg(name, "num_experts", num_experts, is_int(num_experts, 1), "an integer >= 1")
        check_arg(
            name,
            "rank",
            rank,
            rank % num_experts == 0,
            f"a multiple of adapter.num_experts={num_experts} (each expert gets rank/num_experts)",
        )
        check_arg(name, "task_embed_dim", task_embed_dim, is_int(task_embed_dim, 1), "an integer >= 1")
        self.rank = rank
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.expert_rank = rank // num_experts
        self.task_embed_dim = task_embed_dim
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        f32 = torch.float32
        # expert i = rows [i·r_e, (i+1)·r_e) of A and the same columns of B
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=f32))
        self.lora_task_embedding = nn.Parameter(torch.empty(num_tasks, task_embed_dim, device=dev, dtype=f32))
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

    def gate_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``softmax(W_g Emb[t])`` per id, ``(len(ids), E)``, fp32 (autocast off)."""
        with torch.autocast(device_type=self.lora_gate.device.type, enabled=False):
            emb = self.lora_task_embedding.float()[task_ids]
            return torch.softmax(F.linear(emb, self.lora_gate.float()), dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.row_task_ids(x)
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (B, ..., r): all experts at once
        self.capture("lora_A", z)
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
            f"scaling={self.scaling:g}, dropout={self.dropout_p}"
        )
