"""Short in-process training runs of the tiny model with the parallel-LoRA adapters (multilora, lora_split,
molora; docs/methods.md §8): finite, falling loss, the saved adapter tensors, and identical logs under
non-reentrant gradient checkpointing (dropout on, task-routed splits, the router's balance loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.training import SHORT_RUN, assert_short_run_learns, logged, train_tiny

KINDS = {
    "multilora": {"lora_A", "lora_B", "lora_scale"},
    "lora_split": {"lora_A", "lora_B"},
    "molora": {"lora_A", "lora_B", "lora_router"},
}


@pytest.mark.parametrize("method", list(KINDS))
def test_tiny_training_run_loss_is_finite_and_falls(method: str, tmp_path: Path) -> None:
    d = train_tiny(tmp_path, method, [f"adapter={method}", *SHORT_RUN])
    assert_short_run_learns(logged(d))
    w = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in w} == KINDS[method]


@pytest.mark.parametrize(
    "overrides",
    [["adapter=lora_split"], ["adapter=molora", "adapter.top_k=2", "adapter.balance_weight=0.1"]],
    ids=["lora_split", "molora-topk-balance"],
)
def test_gradient_checkpointing_gives_the_same_losses(overrides: list[str], tmp_path: Path) -> None:
    """Recomputation sees the same task ids (split routing) and dropout masks, and the balance loss keeps
    its graph; the logged losses match the plain run."""
    short = [*SHORT_RUN, "train.max_steps=4"]
    plain = logged(train_tiny(tmp_path, "plain", [*overrides, *short]))
    ckpt = logged(train_tiny(tmp_path, "ckpt", [*overrides, *short, "train.gradient_checkpointing=true"]))
    assert ckpt == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]
