"""Short in-process training runs of the tiny model with mtLoRA (docs/methods.md §6): component and
block-level placements learn and save their adapter, the spectral term reaches the loss when it fires,
gradient checkpointing replays the same run, bf16 autocast trains with fp32 adapter weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.training import SHORT_RUN, assert_short_run_learns, logged, train_tiny


@pytest.mark.parametrize(
    ("overrides", "kinds"),
    [
        (["adapter=mtlora_component"], {"q_proj", "v_proj"}),
        (["adapter=mtlora"], {"mlp"}),
        (["adapter=mtlora", "adapter.placement=block_attn"], {"self_attn"}),
    ],
    ids=["component", "block_ffn", "block_attn"],
)
def test_tiny_training_run_loss_falls(overrides: list[str], kinds: set[str], tmp_path: Path) -> None:
    d = train_tiny(tmp_path, "run", [*overrides, *SHORT_RUN])
    assert_short_run_learns(logged(d))
    w = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in w} == {"lora_A", "lora_B", "lora_router"}
    assert {k.rsplit(".", 2)[-2] for k in w} == kinds
    assert any(float(t.abs().max()) > 0 for k, t in w.items() if k.endswith("lora_B"))  # B moved off zero


@pytest.mark.parametrize("mode", ["self_gram", "cross_expert"])
def test_spectral_term_firing_every_step_is_in_the_loss(mode: str, tmp_path: Path) -> None:
    run = ["adapter=mtlora", *SHORT_RUN, "adapter.dropout=0.0", f"adapter.spectral.mode={mode}"]
    run += ["adapter.spectral.every_steps=1"]
    off = logged(train_tiny(tmp_path, "off", [*run, "adapter.spectral.lambda=0.0"]))
    on = logged(train_tiny(tmp_path, "on", [*run, "adapter.spectral.lambda=1.0e4"]))
    assert on[0] == pytest.approx(off[0], rel=1e-9)  # B = 0 at step 0: the penalty has no gradient yet
    assert max(abs(a - b) for a, b in zip(on[1:], off[1:], strict=True)) > 1e-3, (on, off)
    # every 1000 steps (never within six steps) equals lambda = 0
    never = logged(train_tiny(tmp_path, "never", [*run[:-1], "adapter.spectral.every_steps=1000"]))
    assert never == pytest.approx(off, rel=1e-6)


def test_gradient_checkpointing_gives_the_same_run(tmp_path: Path) -> None:
    run = ["adapter=mtlora", "adapter.placement=both", *SHORT_RUN, "train.max_steps=3"]
    plain = logged(train_tiny(tmp_path, "plain", run))  # dropout on: recomputation must replay the masks
    ckpt = logged(train_tiny(tmp_path, "ckpt", [*run, "train.gradient_checkpointing=true"]))
    assert len(plain) == 3
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_bf16_autocast_trains_with_fp32_adapter_weights(tmp_path: Path) -> None:
    d = train_tiny(tmp_path, "bf16", ["adapter=mtlora", *SHORT_RUN, "train.precision=bf16"])
    losses = logged(d)
    assert all(math.isfinite(x) and x < 10 for x in losses) and losses[-1] < losses[0]
    w = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in w.values()} == {"torch.float32"}


def test_balance_and_spectral_terms_are_logged_as_added_to_the_loss(tmp_path: Path, monkeypatch) -> None:
    """``train.jsonl``: ``aux_loss`` = the step's mean over its micro-batches of the adapters' auxiliary
    losses (mtLoRA's BLC), ``reg_loss`` = the spectral regulariser's value at the steps where it fires
    (absent at the others); a plain LoRA run logs neither."""
    from mtlora.adapters.context import AdapterContext
    from mtlora.adapters.spectral import SpectralRegularizer

    aux: list[float] = []
    reg: list[float | None] = []
    total_aux, regularize = AdapterContext.total_aux_loss, SpectralRegularizer.__call__

    def spy_aux(self):
        value = total_aux(self)
        if value is not None:
            aux.append(float(value.detach()))
        return value

    def spy_reg(self, step, steps_per_epoch):
        value = regularize(self, step, steps_per_epoch)
        reg.append(None if value is None else float(value.detach()))
        return value

    monkeypatch.setattr(AdapterContext, "total_aux_loss", spy_aux)
    monkeypatch.setattr(SpectralRegularizer, "__call__", spy_reg)
    run = [*SHORT_RUN, "train.max_steps=4", "train.gradient_accumulation_steps=2"]
    d = train_tiny(tmp_path, "mtlora", ["adapter=mtlora", *run, "adapter.spectral.every_steps=2"])
    recs = [json.loads(x) for x in (d / "metrics" / "train.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and len(aux) == 8 and all(a > 0 for a in aux)
    assert [r["aux_loss"] for r in recs] == pytest.approx(
        [(aux[2 * s] + aux[2 * s + 1]) / 2 for s in range(4)]
    )
    assert [r is None for r in reg] == [True, False, True, False]  # fires at 0-based steps 1 and 3
    assert ["reg_loss" in r for r in recs] == [False, True, False, True]
    assert [r["reg_loss"] for r in recs if "reg_loss" in r] == pytest.approx([reg[1], reg[3]])
    plain = train_tiny(tmp_path, "lora", [*run, "train.max_steps=2"])
    assert not any(
        {"aux_loss", "reg_loss"} & set(json.loads(x))
        for x in (plain / "metrics" / "train.jsonl").read_text().splitlines()
    )
