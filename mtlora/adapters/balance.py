"""The squared coefficient of variation of expert usage, shared by the balance losses (MoLoRA's
``balance_weight``, mtLoRA's BLC) and the routing diagnostics.

.. math::
    \\mathrm{cv}^2(p) = \\frac{\\mathrm{Var}(p)}{\\mathrm{Mean}(p)^2 + 10^{-10}}

over the last dim (the ``N`` experts), with the unbiased variance (as ``torch.var``); ``0`` for one expert.
"""

from __future__ import annotations

import torch

EPS = 1e-10


def cv_squared(p: torch.Tensor) -> torch.Tensor:
    """``Var(p) / (Mean(p)² + 1e-10)`` over the last dim, in ``p``'s dtype (fp32 at least)."""
    if not p.is_floating_point() or p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    if p.shape[-1] == 1:
        return p.new_zeros(p.shape[:-1])
    return p.var(dim=-1) / (p.mean(dim=-1) ** 2 + EPS)
