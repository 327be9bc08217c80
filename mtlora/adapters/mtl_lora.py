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
into the base weight, after which the layer serves rows of task ``t`` only (see :class:`TaskAwareLayer`).
The official optional sigmoid "tunable scaler" (off by default there) is not implemented.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.base import AdapterLayer, check_arg, is_int
from mtlora.adapters.context import AdapterContext
from mtlora.adapters.lora import lora_scaling

LAMBDA_FORMATS = ("full", "diag")


class TaskAwareLayer(AdapterLayer):
    """Shared plumbing of the adapters that read one task id per row (MTL-LoRA, MOELoRA).

    Per-task merge: ``merge(task_id=t)`` sets ``W = W0 + ΔW_t`` (``ΔW_t`` = :meth:`merged_delta_weight`,
    cast to the weight's dtype) and records ``t`` in :attr:`merged_task`; the merged forward is then the
    base layer alone, equal to the unmerged forward for rows of task ``t``. While merged, task ids are
    optional (the merged layer serves task ``t`` whatever the context holds), but rows with another id
    raise a ``ValueError`` (a device-side assert on accelerators, as the id range check). :meth:`unmerge`
    subtracts ``ΔW_t`` again (``W0`` up to fp rounding)."""

    needs_task_ids: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    per_task_mergeable: ClassVar[bool] = True
    method: ClassVar[str] = "task-aware"
    num_tasks: int
    #: the task whose ``ΔW_t`` is folded into the base weight (None when unmerged)
    merged_task: int | None = None

    def _where(self) -> str:
        return f"{type(self).__name__} (adapter.method={self.method}, layer {self.adapter_name})"

    def row_task_ids(self, x: torch.Tensor) -> torch.Tensor:
        """``context.task_ids`` checked against the batch of ``x``: a long tensor ``(B,)`` on x's device."""
        ids = self.context.task_ids
        where = self._where()
        if ids is None:
            raise ValueError(
                f"{where} needs task ids: call model.adapter_context.begin(task_ids=...) with one task id "
                f"per row before every forward (train and eval)"
            )
        if ids.ndim != 1 or x.ndim < 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"{where}: task ids must have shape (batch,) = ({x.shape[0] if x.ndim >= 2 else '?'},), "
                f"got {tuple(ids.shape)} for an input of shape {tuple(x.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{where}: task ids must be integers, got {ids.dtype}")
        if ids.device.type == "cpu":
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
                raise ValueError(
                    f"{where}: task ids must lie in [0, {self.num_tasks}) (adapter.num_tasks), got "
                    f"{sorted(set(ids.tolist()))}"
                )
        else:  # no host sync on accelerators
            torch._assert_async(((ids >= 0) & (ids < self.num_tasks)).all())
        return ids.to(device=x.device, dtype=torch.long)

    def _task_id(self, task_id: int) -> int:
        if not (isinstance(task_id, int) and not isinstance(task_id, bool) and 0 <= task_id < self.num_tasks):
            raise ValueError(f"{type(self).__name__}: task id {task_id!r} not in [0, {self.num_tasks})")
        return task_id

    def delta_weight(self) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} (adapter.method={self.method}) uses task-specific weights chosen per row "
            f"by its task id, so one merged weight cannot serve a mixed-task batch and cannot be merged for "
            f"all tasks; merge it for one task with merge(task_id=t) (merge_adapters(model, task_id=t)), "
            f"which folds in merged_delta_weight(t), or run the model unmerged"
        )

    @torch.no_grad()
    def merge(self, task_id: int | None = None) -> None:
        """Fold ``ΔW_t`` of ``task_id`` into the base weight (a no-op when that task is merged already)."""
        if task_id is None:
            self.delta_weight()  # raises: no whole-model merge
        t = self._task_id(task_id)
        if self.merged:
            if self.merged_task == t:
                return
            raise ValueError(
                f"{self._where()} is merged for task {self.merged_task}; unmerge() before merging task {t}"
            )
        self._fold(self.merged_delta_weight(t), 1.0)
        self.merged_task = t
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._fold(self.merged_delta_weight(self.merged_task), -1.0)
        self.merged_task = None
        self.merged = False

    def _check_merged_rows(self, x: torch.Tensor) -> None:
        """While merged for task ``t``: every row's task id (when the context holds ids) must be ``t``."""
        ids, t = self.context.task_ids, self.merged_task
        if ids is None:
            return
        self.row_task_ids(x)  # shape, dtype and range
        if ids.device.type != "cpu":  # no host sync on accelerators
            torch._assert_async((ids == t).all())
        elif ids.numel() and bool((ids != t).any()):
            raise ValueError(
                f"{self._where()} is merged for task {t}, so it serves rows of task {t} only; got task ids "
                f"{sorted(set(ids.tolist()))}: unmerge (unmerge_adapters(model)) to run other or mixed tasks, "
                f"or merge their task instead"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._check_merged_rows(x)
        return super().forward(x)

    def merged_delta_weight(self, task_id: int) -> torch.Tensor:
        """``ΔW_t`` (fp32, ``(d_out, d_in)``) such that the update for rows of task ``t`` is ``x ΔW_tᵀ``."""
        raise NotImplementedError


class MtlLoraLinear(TaskAwareLayer):
    method: ClassVar[str] = "mtl_lora"
    required_keys: ClassVar[tuple[str, ...]] = ("num_tasks",)
    defaults: ClassVar[dict] = {"num_up": 3, "tau": 0.1, "lambda_format": "full"}

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
        d = self.defaults
        num_up = d["num_up"] if num_up is None else num_up
        tau = d["tau"] if tau is None else tau
        lambda_format = d["lambda_format"] if lambda_format is None else lambda_format
        check_arg(name, "rank", rank, is_int(rank, 1), "an integer >= 1")
        check_arg(name, "num_tasks", num_tasks, is_int(num_tasks, 1), "an integer >= 1")
        check_arg(name, "num_up", num_up, is_int(num_up, 1), "an integer >= 1")
        check_arg(
            name,
            "tau",
            tau,
            isinstance(tau, int | float) and not isinstance(tau, bool) and tau > 0,
            "a number > 0",
        )
        check_arg(
            name, "lambda_format", lambda_format, lambda_format in LAMBDA_FORMATS, f"one of {LAMBDA_FORMATS}"
        )
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
