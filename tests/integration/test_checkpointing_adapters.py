"""Non-reentrant gradient checkpointing replays the same run for the routed, task-aware and DoRA adapters
(hydralora, rlora, mtl_lora, moelora, dora; lora, lora_split, molora, multilora and mtlora are covered in
test_training, test_parallel_training and test_mtlora_training): with dropout on, the recomputed forward
must see the same masks (per-head masks for HydraLoRA/R-LoRA), the same task ids (MTL-LoRA, MOELoRA) and
the same weight norm (DoRA), so the logged losses of four steps match the plain run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.training import SHORT_RUN, logged, train_tiny

CASES = {
    "hydralora": ["adapter=hydralora"],  # dropout_place=input_per_head: one mask per head
    "rlora": ["adapter=rlora"],  # A_out_per_head masks, random init, initial-output offset
    "mtl_lora": ["adapter=mtl_lora"],
    # A ~ N(0, 0.01²) makes B's gradients small: a larger lr so the loss moves in four steps
    "moelora": ["adapter=moelora", "train.optimizer.lr=1e-2"],
    "dora": ["adapter=dora"],
}


@pytest.mark.parametrize("method", list(CASES))
def test_gradient_checkpointing_gives_the_same_losses(method: str, tmp_path: Path) -> None:
    run = [*CASES[method], *SHORT_RUN, "train.max_steps=4", "adapter.dropout=0.3"]
    plain = logged(train_tiny(tmp_path, "plain", run))
    ckpt = logged(train_tiny(tmp_path, "ckpt", [*run, "train.gradient_checkpointing=true"]))
    assert len(plain) == 4
    assert ckpt == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]
