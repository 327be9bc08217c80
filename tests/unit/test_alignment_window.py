"""alignment.window=step and alignment.gather: the statistics of several micro-batches / processes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtlora.errors import ConfigError
from mtlora.losses.alignment import alignment_loss
from mtlora.training.alignment_window import AlignmentTerm


def term(**kw) -> AlignmentTerm:
    cfg = {
        "name": "kl",
        "weight": 0.2,
        "layers": "all",
        "pool": "masked_mean",
        "pair_reduce": "sum",
        "layer_reduce": "mean",
        "bandwidths": None,
        **kw,
    }
    return AlignmentTerm.from_config(OmegaConf.create(cfg))


def micro_batch(seed: int, rows: int = 6, seq: int = 5, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    captured = {f"layers.{i}.mlp.up_proj.lora_A": torch.randn(rows, seq, r, generator=g) for i in range(2)}
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, 3:] = 0
    ids = torch.tensor([0, 1, 2] * (rows // 3))
    return captured, mask, ids


@pytest.mark.parametrize("metric", ["kl", "mmd"])
@pytest.mark.parametrize("pool", ["mean", "masked_mean"])
def test_step_window_equals_the_loss_of_the_concatenated_rows(metric: str, pool: str) -> None:
    t = term(name=metric, pool=pool, window="step")
    parts = [micro_batch(1), micro_batch(2)]
    got = t.from_pooled([t.pooled(c, m) for c, m, _ in parts], [i for _, _, i in parts])
    captured = {n: torch.cat([p[0][n] for p in parts]) for n in parts[0][0]}
    want = alignment_loss(
        captured,
        torch.cat([p[2] for p in parts]),
        torch.cat([p[1] for p in parts]),
        metric=metric,
        pool_mode=pool,
        pair_reduce="sum",
        layer_reduce="mean",
    )
    torch.testing.assert_close(got, want)
    # and it is not the mean of the per-micro-batch losses (the window really widens the statistics)
    per_micro = torch.stack([t._loss(c, i, m, pool, "all") for c, m, i in parts]).mean()
    assert not torch.allclose(got, per_micro)


def test_step_window_gradient_reaches_every_micro_batch() -> None:
    t = term(window="step")
    parts = [micro_batch(3), micro_batch(4)]
    for c, _, _ in parts:
        for v in c.values():
            v.requires_grad_(True)
    loss = t.from_pooled([t.pooled(c, m) for c, m, _ in parts], [i for _, _, i in parts])
    loss.backward()
    for c, _, _ in parts:
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in c.values())


def test_gather_without_a_process_group_is_the_local_loss() -> None:
    c, m, i = micro_batch(5)
    torch.testing.assert_close(term(gather=True)(c, i, m), term()(c, i, m))


def test_layer_selection_applies_before_pooling() -> None:
    t = term(layers=["layers.1."], window="step")
    c, m, i = micro_batch(6)
    assert list(t.pooled(c, m)) == ["layers.1.mlp.up_proj.lora_A"]


@pytest.mark.parametrize("kw", [{"window": "step"}, {"gather": True}])
def test_pooling_across_rows_needs_a_pooled_representation(kw: dict) -> None:
    with pytest.raises(ConfigError, match="pool=mean or masked_mean"):
        term(pool="none", **kw)


def test_unknown_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="alignment.window"):
        term(window="epoch")
