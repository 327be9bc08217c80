"""Causal-LM loss on the answer tokens only.

Two implementations (``train.loss.impl``):

* ``full``: the model's ``(B, L, V)`` logits, cast to fp32 as a whole, then cross-entropy;
* ``chunked``: the model runs with its output head bypassed (it returns the final hidden states), the
  hidden states of the answer positions only (labels != -100 after the shift) are gathered, and the head +
  fp32 cross-entropy run on ``train.loss.chunk_tokens`` of them at a time, each chunk under
  ``torch.utils.checkpoint`` so neither the forward nor the backward ever holds more than one chunk's
  logits. Same values and gradients as ``full`` (up to float summation order).

The call goes through the (possibly DDP-wrapped) model's own forward, so gradient synchronisation hooks
still apply; packed batches (with ``position_ids``, see :mod:`mtlora.data.packing`) are passed without an
attention mask so transformers derives the per-example block-diagonal causal mask from the positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtlora.utils.labels import IGNORE_INDEX

LOSS_IMPLS = ("full", "chunked")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy (fp32) and the mask of positions that count.

    ``logits``: ``(B, L, V)``; ``labels``: ``(B, L)`` with ``-100`` on prompt and padding. Position *i*
    predicts token *i+1*, so both outputs have shape ``(B, L-1)``; masked positions hold 0.
    """
    shifted = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shifted)
    return ce, shifted != IGNORE_INDEX


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_token_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_cross_entropy` from the final hidden states ``(B, L, H)`` and the output ``head``,
    computing the logits of at most ``chunk_tokens`` answer positions at a time (each chunk checkpointed)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    h = hidden[:, :-1][mask]  # (N, H): only the positions whose next token is an answer token
    t = shifted[mask]
    pieces = [
        checkpoint(_chunk_ce, head, h[i : i + chunk_tokens], t[i : i + chunk_tokens], use_reentrant=False)
        for i in range(0, h.size(0), chunk_tokens)
    ]
    ce = torch.zeros(shifted.shape, dtype=torch.float32, device=hidden.device)
    # no answer token: a zero loss that still belongs to the graph (backward works, gradients 0)
    ce = ce.masked_scatter(mask, torch.cat(pieces)) if pieces else ce + hidden.sum().float() * 0.0
    return ce, mask


@contextlib.contextmanager
def head_bypassed(head: nn.Module) -> Iterator[None]:
    """Make ``head`` the identity for the duration: the model's ``.logits`` are then its final hidden
    states (works through DDP/Accelerate wrappers, which a direct ``model.model(...)`` call would skip)."""
    had = "forward" in head.__dict__
    prev = head.__dict__.get("forward")
    head.forward = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        if had:
            head.forward = prev
        else:
            del head.forward


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """The forward kwargs of a training batch: padded rows use their attention mask; packed rows
    (``position_ids`` present) pass ``attention_mask=None`` and ``use_cache=False`` so that
    transformers' ``find_packed_sequence_indices`` builds the per-example mask from the positions."""
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    impl: str = "full",
    chunk_tokens: int = 4096,
    head: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``batch`` through ``model`` and return per-token ``ce`` and ``mask``, both ``(B, L-1)``.

    ``head``: the output projection to bypass and apply per chunk under ``impl="chunked"`` (default:
    ``model.get_output_embeddings()``; pass the unwrapped model's when ``model`` is DDP-wrapped)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"train.loss.impl={impl!r}: allowed values are {list(LOSS_IMPLS)}")
    kwargs = model_inputs(batch)
    if impl == "full":
        return token_cross_entropy(model(**kwargs).logits, batch["labels"])
    head = head if head is not None else model.get_output_embeddings()
    with head_bypassed(head):
        hidden = model(**kwargs).logits
    return chunked_token_cross_entropy(hidden, head, batch["labels"], int(chunk_tokens))
