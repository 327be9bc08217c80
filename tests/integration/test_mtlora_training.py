"""Short in-process training runs of the tiny model with mtLoRA (docs/methods.md §6): component and
block-level placements learn and save their adapter, the spectral term reaches the loss when it fires,
gradient checkpointing replays the same run, bf16 autocast trains with fp32 adapter weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
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


def _spectral_reference_grad(bs: list) -> list:
    """∇ of mean over all matrices B (d_out × r) of Σ_kl (w_k w_l (BᵀB − c²I)_kl)², w_k = exp(−σ_k/(σ̄+1e-8)),
    c = ‖B‖_F/√r + 1e-8 (σ, c held constant), one matrix at a time in float64 (mtLoRA's self_gram penalty)."""
    leaves = [b.detach().double().clone().requires_grad_(True) for b in bs]
    terms = []
    for stack in leaves:
        for i in range(stack.shape[0]):
            b = stack[i]
            r = b.shape[1]
            sigma = torch.linalg.svdvals(b.detach())
            w = torch.exp(-sigma / (sigma.mean() + 1e-8))
            c = float(torch.linalg.norm(b.detach())) / math.sqrt(r) + 1e-8
            diff = b.T @ b - c * c * torch.eye(r, dtype=torch.float64)
            terms.append(sum((w[k] * w[m] * diff[k, m]) ** 2 for k in range(r) for m in range(r)))
    torch.autograd.backward(torch.stack(terms).mean())
    return [leaf.grad for leaf in leaves]


def test_spectral_term_weighs_lambda_over_ga_in_the_step_gradient(tmp_path: Path) -> None:
    """One SGD step at GA = 2: the spectral term moves B by −lr · (λ / GA) · ∇L_spec(B₀) (the official trainer
    adds λ·L_spec to one micro-batch loss, which the HF Trainer then divides by GA)."""
    lam, lr, ga = 1.0e3, 0.1, 2
    run = [
        "adapter=mtlora",
        "adapter.block_style=bottleneck",  # B₀ ~ N(0, 0.02²): the penalty has a gradient at step 0
        "adapter.dropout=0.0",
        "adapter.spectral.every_steps=1",
        *SHORT_RUN,
        "train.max_steps=1",
        f"train.gradient_accumulation_steps={ga}",
        "train.micro_batch_size=4",
        "train.max_grad_norm=null",
        "train.warmup_ratio=0.0",
        "train.optimizer._target_=torch.optim.SGD",
        "~train.optimizer.betas",
        "~train.optimizer.eps",
        f"train.optimizer.lr={lr}",
    ]

    def b_after(name: str, extra: list[str]) -> dict:
        w = load_file(
            str(train_tiny(tmp_path, name, [*run, *extra]) / "adapter" / "adapter_model.safetensors")
        )
        return {k: v for k, v in w.items() if k.endswith("lora_B")}

    init = b_after("init", ["train.optimizer.lr=0.0"])  # lr 0: the saved adapter is the init
    off = b_after("off", ["adapter.spectral.lambda=0.0"])
    on = b_after("on", [f"adapter.spectral.lambda={lam}"])
    keys = sorted(init)
    assert len(keys) == 2 and all(init[k].shape == (16, 96, 16) for k in keys)  # 32 matrices < max_matrices
    grads = _spectral_reference_grad([init[k] for k in keys])
    for k, g in zip(keys, grads, strict=True):
        moved = (on[k] - off[k]).double()
        expected = -lr * lam / ga * g
        assert float(expected.abs().max()) > 1e-4  # a visible effect is checked
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("placement", ["block_ffn", "component"])
def test_blc_grad_false_leaves_the_router_to_the_task_loss_under_checkpointing(
    placement: str, tmp_path: Path
) -> None:
    """With B = 0 at step 0 the task loss gives the router no gradient, so after one step the router has
    moved only if the balance loss reaches it: never with blc_grad=false (the released scripts' inert BLC),
    always with true; gradient checkpointing on, as the presets."""
    run = ["adapter=mtlora", f"adapter.placement={placement}", *SHORT_RUN, "train.max_steps=1"]
    run += ["train.gradient_checkpointing=true", "train.warmup_ratio=0.0"]

    def routers(name: str, extra: list[str]) -> dict:
        d = train_tiny(tmp_path, name, [*run, *extra])
        w = load_file(str(d / "adapter" / "adapter_model.safetensors"))
        return {k: v for k, v in w.items() if k.endswith("lora_router")}

    init = routers("init", ["train.optimizer.lr=0.0"])
    off = routers("off", ["adapter.blc_grad=false"])
    on = routers("on", ["adapter.blc_grad=true"])
    assert init and set(init) == set(off) == set(on)
    for k in init:
        assert torch.equal(off[k], init[k]), k
        assert float((on[k] - init[k]).abs().max()) > 1e-5, k


def test_balance_and_spectral_terms_are_logged_as_added_to_the_loss(tmp_path: Path, monkeypatch) -> None:
    """``train.jsonl``: ``aux_loss`` = the step's mean over its micro-batches of the adapters' auxiliary
    losses (mtLoRA's BLC), ``reg_loss`` = the spectral regulariser's value ÷ GA (its weight in the step's
    loss) at the steps where it fires (absent at the others); a plain LoRA run logs neither."""
    from mtlora.adapters.context import AdapterContext
    from mtlora.adapters.mtlora.spectral_penalty import SpectralRegularizer

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
    assert [r["reg_loss"] for r in recs if "reg_loss" in r] == pytest.approx([reg[1] / 2, reg[3] / 2])
    plain = train_tiny(tmp_path, "lora", [*run, "train.max_steps=2"])
    assert not any(
        {"aux_loss", "reg_loss"} & set(json.loads(x))
        for x in (plain / "metrics" / "train.jsonl").read_text().splitlines()
    )
