"""Shared plumbing of the task-aware adapters (MTL-LoRA, MOELoRA): one task id per row, per-task merge."""

from __future__ import annotations

from typing import ClassVar

import torch

from mtlora.adapters.base import AdapterLayer


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
