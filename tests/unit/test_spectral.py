"""mtLoRA's spectral-aware regulariser (docs/methods.md §6(c)): both penalties against independent NumPy
float64 computations, their gradients, the schedule against a re-implementation of the official trainer's
"last step" bookkeeping, the seeded subset, and config checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from mtlora.adapters import SpectralRegularizer, cross_expert_penalty, self_gram_penalty
from mtlora.errors import ConfigError


def np_self_gram(b: np.ndarray) -> float:
    b = b.astype(np.float64)
    r = b.shape[1]
    s = np.linalg.svd(b, compute_uv=False)
    s = np.concatenate([s, np.zeros(r - len(s))])
    w = np.exp(-s / (s.mean() + 1e-8))
    c = np.linalg.norm(b) / np.sqrt(r) + 1e-8
    d = b.T @ b - c**2 * np.eye(r)
    total = 0.0
    for k in range(r):
        for m in range(r):
            total += (w[k] * w[m] * d[k, m]) ** 2
    return total


def np_cross_expert(bs: np.ndarray) -> float:
    bs = bs.astype(np.float64)
    primes = []
    for b in bs:
        _, s, vh = np.linalg.svd(b, full_matrices=False)
        w = np.exp(-s / (s.mean() + 1e-8))
        primes.append(b @ vh.T @ np.diag(w) @ vh)
    total = 0.0
    for i in range(len(bs)):
        for j in range(i + 1, len(bs)):
            total += np.sum((primes[i].T @ primes[j]) ** 2)
    return total


@pytest.mark.parametrize(("d_out", "r"), [(12, 4), (40, 8), (3, 5)])
def test_self_gram_penalty_matches_numpy(d_out: int, r: int) -> None:
    g = torch.Generator().manual_seed(d_out)
    bs = torch.randn(3, d_out, r, generator=g) * torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1)
    got = self_gram_penalty(bs)
    assert got.shape == (3,)
    for i in range(3):
        assert float(got[i]) == pytest.approx(np_self_gram(bs[i].numpy()), rel=1e-4)
        assert float(self_gram_penalty(bs[i])) == pytest.approx(float(got[i]), rel=1e-6)
    assert float(got.min()) > 0


@pytest.mark.parametrize(("n", "d_out", "r"), [(2, 10, 3), (4, 16, 4), (3, 8, 8)])
def test_cross_expert_penalty_matches_numpy(n: int, d_out: int, r: int) -> None:
    bs = torch.randn(n, d_out, r, generator=torch.Generator().manual_seed(n))
    got = float(cross_expert_penalty(bs))
    assert got == pytest.approx(np_cross_expert(bs.numpy()), rel=1e-4)
    assert got > 0
    # batched over leading dims
    two = cross_expert_penalty(torch.stack([bs, 2 * bs]))
    assert two.shape == (2,) and float(two[0]) == pytest.approx(got, rel=1e-5)


def test_cross_expert_penalty_is_zero_for_orthogonal_experts() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0)))
    bs = torch.stack([q[:, 0:3] * 2.0, q[:, 3:6], q[:, 6:9] * 0.5])  # mutually orthogonal column spaces
    assert float(cross_expert_penalty(bs)) == pytest.approx(0.0, abs=1e-8)


def test_gradients_flow_through_b_with_spectral_weights_detached() -> None:
    g = torch.Generator().manual_seed(3)
    b = torch.randn(10, 4, generator=g, dtype=torch.float64).requires_grad_()
    self_gram_penalty(b).backward()
    # reference: the same formula with w and c as constants (float64)
    bd = b.detach()
    s = torch.linalg.svdvals(bd)
    w = torch.exp(-s / (s.mean() + 1e-8))
    c = torch.linalg.norm(bd) / 2 + 1e-8
    b2 = bd.clone().requires_grad_()
    ((w[:, None] * w[None, :] * (b2.T @ b2 - c**2 * torch.eye(4, dtype=torch.float64))) ** 2).sum().backward()
    torch.testing.assert_close(b.grad.double(), b2.grad, rtol=1e-4, atol=1e-6)

    bs = torch.randn(3, 10, 4, generator=g, dtype=torch.float64).requires_grad_()
    cross_expert_penalty(bs).backward()
    _, s, vh = torch.linalg.svd(bs.detach(), full_matrices=False)
    w = torch.exp(-s / (s.mean(-1, keepdim=True) + 1e-8))
    proj = vh.mT @ torch.diag_embed(w) @ vh
    bs2 = bs.detach().clone().requires_grad_()
    bp = bs2 @ proj
    sum(((bp[i].T @ bp[j]) ** 2).sum() for i in range(3) for j in range(i + 1, 3)).backward()
    torch.testing.assert_close(bs.grad.double(), bs2.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the regulariser


class _Holder(nn.Module):
    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.lora_B = nn.Parameter(b)


def holders(num_layers: int = 3, n: int = 4, d: int = 12, r: int = 3, seed: int = 0) -> list[_Holder]:
    g = torch.Generator().manual_seed(seed)
    return [_Holder(torch.randn(n, d, r, generator=g)) for _ in range(num_layers)]


def code_schedule(total_steps: int, every_steps: int | None, steps_per_epoch: int) -> list[int]:
    """The official trainer's bookkeeping: last step/epoch start at −1, set each time it fires."""
    fired, last_step, last_epoch = [], -1, -1
    for step in range(total_steps):
        epoch = step // steps_per_epoch
        if every_steps is not None:
            if step - last_step >= every_steps:
                fired.append(step)
                last_step = step
        elif epoch - last_epoch >= 1:
            fired.append(step)
            last_epoch = epoch
    return fired


@pytest.mark.parametrize(("every", "spe"), [(1, 10), (5, 7), (500, 938), (None, 4), (None, 1)])
def test_fires_exactly_at_the_code_steps_and_returns_none_otherwise(every, spe: int) -> None:
    reg = SpectralRegularizer(holders(), every_steps=every, lam=0.5)
    total = 1200 if every == 500 else 23
    fired = [s for s in range(total) if reg(s, spe) is not None]
    assert fired == code_schedule(total, every, spe)
    assert fired  # fires at least once in the window
    if every == 5:
        assert fired == [4, 9, 14, 19]
    if every is None and spe == 4:
        assert fired == [0, 4, 8, 12, 16, 20]


def test_value_is_lambda_times_mean_over_all_matrices() -> None:
    layers = holders()
    reg = SpectralRegularizer(layers, mode="self_gram", lam=0.7, every_steps=1, max_matrices=64)
    expected = np.mean([np_self_gram(b.numpy()) for layer in layers for b in layer.lora_B.detach()])
    value = reg(0, 10)
    assert float(value.detach()) == pytest.approx(0.7 * expected, rel=1e-4)
    value.backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0 for layer in layers)

    reg = SpectralRegularizer(layers, mode="cross_expert", lam=2.0, every_steps=1)
    expected = np.mean([np_cross_expert(layer.lora_B.detach().numpy()) for layer in layers])
    assert float(reg(0, 10).detach()) == pytest.approx(2.0 * expected, rel=1e-4)


def test_subset_is_seeded_by_the_step() -> None:
    layers = holders(num_layers=3, n=4)  # 12 matrices
    reg = SpectralRegularizer(layers, mode="self_gram", lam=1.0, every_steps=1, max_matrices=5)
    pairs = [(li, e) for li in range(3) for e in range(4)]
    values = []
    for step in (0, 1, 2):
        chosen = random.Random(step).sample(pairs, 5)
        expected = np.mean([np_self_gram(layers[li].lora_B[e].detach().numpy()) for li, e in chosen])
        v = float(reg(step, 10).detach())
        assert v == pytest.approx(expected, rel=1e-4)
        assert v == float(reg(step, 10).detach())  # same step, same subset (also after a resume)
        values.append(v)
    assert len(set(values)) == 3
    # cross_expert samples whole layers: max(1, 5 // 4) = 1 layer per step
    reg = SpectralRegularizer(layers, mode="cross_expert", lam=1.0, every_steps=1, max_matrices=5)
    for step in (0, 7):
        (li,) = random.Random(step).sample(range(3), 1)
        expected = np_cross_expert(layers[li].lora_B.detach().numpy())
        assert float(reg(step, 10).detach()) == pytest.approx(expected, rel=1e-4)


def test_runs_in_fp32_under_bf16_autocast() -> None:
    reg = SpectralRegularizer(holders(), every_steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = reg(0, 1)
    assert v.dtype == torch.float32


def test_from_config_off_and_errors() -> None:
    assert SpectralRegularizer.from_config(None) is None
    assert SpectralRegularizer.from_config({"mode": "none"}) is None
    assert SpectralRegularizer.from_config({"mode": "self_gram", "lambda": 0}) is None
    reg = SpectralRegularizer.from_config({"mode": "cross_expert", "lambda": 0.5, "every_steps": None})
    assert (reg.mode, reg.lam, reg.every_steps, reg.max_matrices) == ("cross_expert", 0.5, None, 64)
    for bad, key in (
        ({"mode": "x"}, "spectral.mode"),
        ({"lambda": -1}, "spectral.lambda"),
        ({"every_steps": 0}, "spectral.every_steps"),
        ({"every_steps": 2.5}, "spectral.every_steps"),
        ({"max_matrices": 0}, "spectral.max_matrices"),
    ):
        with pytest.raises(ConfigError, match=rf"adapter\.{key}"):
            SpectralRegularizer.from_config(bad)
