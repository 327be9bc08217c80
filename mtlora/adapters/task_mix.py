"""MTL-LoRA (Yang, Muhtar, Shen et al., AAAI 2025; ``docs/methods.md`` §5, §11, §12.5).

For a row of task ``t``:

.. math::
    h = W_0 x + s\\, \\tilde B_t\\, \\Lambda_t\\, A\\, \\mathrm{drop}(x), \\qquad
    \\tilde B_t = \\sum_{j=1}^{n} \\mathrm{softmax}_j(w_t / \\tau)\\, B_j

* shared ``A ∈ R^{r×d_in}`` (``lora_A``, kaiming-uniform(a=√5));
* task-specific ``Λ_t`` (``lora_lambda``): ``(T, r, r)`` initialised to the identity (``lambda_format=full``,
  the official training script) or ``(T, r)`` initialised to ones (``diag``, the paper's "diagonal");
* ``n = num_up`` shared up-projections ``B_j ∈ R^{d_out×r}`` (``lora_B``, ``(n, d_out, r)``, zeros);
* task logits ``w ∈ R^{T×n}`` (``lora_task_logits``, kaiming-uniform(a=√5)), temperature ``τ = tau``;
  the mixing softmax is computed in fp32.

Every row carries its own task id (``context.task_ids``, shape ``(B,)``), required in train and eval;
mixed-task batches gather per-row ``Λ_t`` and mixing weights (one ``bmm`` and one matmul; no loop over
tasks or up-projections). Not mergeable for all tasks at once (one weight cannot serve rows of different
tasks); merged per task: ``merge(task_id=t)`` folds ``ΔW_t = s B̃_t Λ_t A`` (:meth:`merged_delta_weight`)
into the base weight, after which the layer serves rows of task ``t`` only (see :class:`~mtlora.adapters.task_aware.TaskAwareLayer`).
The official optional sigmoid "tunable scaler" (off by default there) is not implemented.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling
from mtlora.adapters.methods.task_aware import MTL_LORA
from mtlora.adapters.task_aware import TaskAwareLayer


class TaskMixLoraLinear(TaskAwareLayer):
    """MTL-LoRA's layer: task-specific Λ_t between a shared A and task-mixed up-projections (module doc)."""

    method: ClassVar[str] = MTL_LORA.name
    spec = MTL_LORA

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
        num_up: int | None = None,
        tau: float | None = None,
        lambda_format: str | None = None,
    ) -> None:
        super().__init__(base_layer, name, context)
        v = self.resolve_knobs(
            name, rank=rank, num_tasks=num_tasks, num_up=num_up, tau=tau, lambda_format=lambda_format
        )
        num_up, tau, lambda_format = v["num_up"], v["tau"], v["lambda_format"]
        self.rank = rank
        self.num_tasks = num_tasks
        self.num_up = num_up
        self.tau = float(tau)
        self.lambda_format = lambda_format
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        f32 = torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=f32))
        lam_shape = (num_tasks, rank, rank) if lambda_format == "full" else (num_tasks, rank)
        self.lora_lambda = nn.Parameter(torch.empty(lam_shape, device=dev, dtype=f32))
        self.lora_B = nn.Parameter(torch.zeros(num_up, self.out_features, rank, device=dev, dtype=f32))
        self.lora_task_logits = nn.Parameter(torch.empty(num_tasks, num_up, device=dev, dtype=f32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.lora_task_logits, a=math.sqrt(5))
        if self.lambda_format == "full":
            self.lora_lambda.copy_(torch.eye(self.rank).expand_as(self.lora_lambda))
        else:
            nn.init.ones_(self.lora_lambda)

    def up_heads(self) -> torch.Tensor:
        """The ``num_up`` shared up-projections ``B_j``, ``(n, d_out, r)``."""
        return self.lora_B

    def mixing_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``softmax(w_t / τ)`` over the up-projections for each id, ``(len(ids), num_up)``, fp32."""
        with torch.autocast(device_type=self.lora_task_logits.device.type, enabled=False):
            return torch.softmax(self.lora_task_logits.float()[task_ids] / self.tau, dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.row_task_ids(x)
        b, r, n = x.shape[0], self.rank, self.num_up
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (B, ..., r)
        self.capture("lora_A", z)
        zf = z.reshape(b, -1, r)  # (B, L, r)
        lam = self.lora_lambda.to(z.dtype)[ids]
        # Λ_t z per row: one bmm (full) or a broadcast product (diag)
        zf = torch.bmm(zf, lam.transpose(1, 2)) if self.lambda_format == "full" else zf * lam.unsqueeze(1)
        w = self.mixing_weights(ids).to(z.dtype)  # (B, n)
        u = w[:, None, :, None] * zf.unsqueeze(2)  # (B, L, n, r): column block j scaled by w_tj
        bmat = self.lora_B.to(z.dtype).permute(1, 0, 2).reshape(self.out_features, n * r)
        out = F.linear(u.reshape(b, -1, n * r), bmat) * self.scaling
        return out.reshape(*x.shape[:-1], self.out_features)

    def merged_delta_weight(self, task_id: int) -> torch.Tensor:
        t = self._task_id(task_id)
        w = torch.softmax(self.lora_task_logits.float()[t] / self.tau, dim=-1)
        b_t = torch.einsum("j,jor->or", w, self.lora_B.float())
        lam = self.lora_lambda.float()[t]
        lam = lam if self.lambda_format == "full" else torch.diag(lam)
        return self.scaling * (b_t @ lam @ self.lora_A.float())

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_tasks={self.num_tasks}, num_up={self.num_up}, tau={self.tau:g}, "
            f"lambda={self.lambda_format}, scaling={self.scaling:g}, dropout={self.dropout_p}"
        )
