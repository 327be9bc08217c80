"""Align-LoRA's groups, step weight and padding: the released index arithmetic (``alignment.grouping``),
``weighting`` (λ/GA vs λ), ``backprop`` and ``pad_to`` (rows of one length for per-position statistics)."""

from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf

from mtlora.data.collate import IGNORE_INDEX, collate
from mtlora.errors import ConfigError
from mtlora.losses.alignment import released_group_ids, released_groups
from mtlora.training.alignment_window import AlignmentTerm


def term(**kw) -> AlignmentTerm:
    cfg = {
        "name": "kl",
        "weight": 0.2,
        "layers": "all",
        "pool": "none",
        "pair_reduce": "mean",
        "layer_reduce": "mean",
        "bandwidths": None,
        "window": "step",
        "pad_to": 7,
        **kw,
    }
    return AlignmentTerm.from_config(OmegaConf.create(cfg))


def _code_groups(features: torch.Tensor, ga: int, n_tasks: int) -> list[torch.Tensor]:
    """The released trainer's grouping, typed out: split into chunks of GA rows, chunk each into T pieces,
    group t = the t-th pieces concatenated."""
    chunks = torch.split(features, ga, dim=0)
    return [torch.cat([torch.chunk(c, n_tasks, dim=0)[t] for c in chunks], dim=0) for t in range(n_tasks)]


def _window(ga: int, n_tasks: int, per_task: int, seed: int) -> list[torch.Tensor]:
    """Task ids of ``ga`` micro-batches holding ``per_task`` rows of each task, shuffled within each."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n_tasks).repeat_interleave(per_task)
    return [base[torch.randperm(len(base), generator=g)] for _ in range(ga)]


@pytest.mark.parametrize(("ga", "n_tasks", "per_task"), [(10, 5, 1), (4, 4, 1), (3, 2, 2), (10, 4, 2)])
def test_released_grouping_reproduces_the_released_index_arithmetic(
    ga: int, n_tasks: int, per_task: int
) -> None:
    """Rows shuffled within each micro-batch; the released sampler's layout is each micro-batch in task order.
    Every group of ours holds exactly the rows the typed-out torch.split / torch.chunk puts in that group."""
    ids = _window(ga, n_tasks, per_task, seed=ga + n_tasks)
    groups = released_group_ids(ids, ga, n_tasks)
    # the same window laid out as the released sampler does, each row carrying its index in our order
    order, offset = [], 0
    for m in ids:
        order.append(torch.argsort(m, stable=True) + offset)
        offset += len(m)
    code = _code_groups(torch.cat(order), ga, n_tasks)
    assert [sorted(g.tolist()) for g in code] == [
        sorted(torch.nonzero(groups == t).flatten().tolist()) for t in range(n_tasks)
    ]


def test_released_groups_mix_two_tasks_at_micro_batch_5_and_ga_10() -> None:
    """The released train.py's layout (5 tasks, 1 row each per micro-batch, GA 10): group 0 holds tasks 0 and 1,
    group 2 tasks 4 and 0 -- no group is one task's rows."""
    ids = [torch.arange(5) for _ in range(10)]
    groups = released_group_ids(ids, 10, 5)
    tasks = torch.cat(ids)
    mixed = [sorted(set(tasks[groups == g].tolist())) for g in range(5)]
    assert mixed == [[0, 1], [2, 3], [0, 4], [1, 2], [3, 4]]
    assert all(int((groups == g).sum()) == 10 for g in range(5))


def test_released_grouping_fails_where_the_released_code_fails() -> None:
    """8 tasks, 1 row each, GA 10: chunks of 10 rows give 5 pieces of 2, and the code indexes piece 5."""
    with pytest.raises(IndexError):
        _code_groups(torch.arange(80), 10, 8)
    with pytest.raises(ValueError, match="fewer than the 8 groups"):
        released_groups(80, 10, 8)
    with pytest.raises(ConfigError, match="alignment.grouping=released"):
        term(grouping="released").group_ids([torch.arange(8) for _ in range(10)])


def _sym_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    vx = ((x - mx) ** 2).sum(0) / (len(x) - 1) + 1e-8
    vy = ((y - my) ** 2).sum(0) / (len(y) - 1) + 1e-8
    kl = 0.5 * (torch.log(vy / vx) + vx / vy + (mx - my) ** 2 / vy - 1).sum(-1)
    lk = 0.5 * (torch.log(vx / vy) + vy / vx + (mx - my) ** 2 / vx - 1).sum(-1)
    return (0.5 * (kl + lk)).mean()


@pytest.mark.parametrize("grouping", ["task", "released"])
def test_window_loss_compares_the_groups_per_position_over_rows_padded_to_one_length(grouping: str) -> None:
    """window=step, pool=none: the (rows, 7, r) features of 10 micro-batches (rows padded to 7 positions)
    give the mean over layers and group pairs of the per-position symmetric KL of the chosen groups."""
    ga, n_tasks = 10, 5
    ids = _window(ga, n_tasks, 1, seed=3)
    g = torch.Generator().manual_seed(0)
    parts = [{f"l{i}.lora_A": torch.randn(n_tasks, 7, 3, generator=g) for i in range(2)} for _ in range(ga)]
    got = term(grouping=grouping).from_pooled(parts, ids)
    per_layer = []
    for name in parts[0]:
        feats = torch.cat([p[name] for p in parts])
        if grouping == "task":
            tasks = torch.cat(ids)
            groups = [feats[tasks == t] for t in range(n_tasks)]
        else:  # the window in the released layout, grouped by the typed-out arithmetic
            layout = torch.cat([torch.argsort(m, stable=True) + i * n_tasks for i, m in enumerate(ids)])
            groups = _code_groups(feats[layout], ga, n_tasks)
        per_layer.append(torch.stack([_sym_kl(a, b) for a, b in itertools.combinations(groups, 2)]).mean())
    torch.testing.assert_close(got.double(), torch.stack(per_layer).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("weighting", "want"), [("code", 0.02), ("paper", 0.2)])
def test_step_weight(weighting: str, want: float) -> None:
    assert term(weighting=weighting).step_weight(10) == pytest.approx(want)


def test_backprop_false_logs_the_term_without_a_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    parts = [{"l.lora_A": torch.randn(4, 7, 3, generator=g, requires_grad=True)} for _ in range(3)]
    ids = [torch.arange(4)] * 3
    live, dead = term().from_pooled(parts, ids), term(backprop=False).from_pooled(parts, ids)
    assert live.requires_grad and not dead.requires_grad
    torch.testing.assert_close(live.detach(), dead)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pad_to": None}, "alignment.pad_to"),  # per-position statistics across micro-batches
        ({"grouping": "released", "window": "micro"}, "alignment.window=step"),
        ({"grouping": "by_row"}, "alignment.grouping"),
        ({"weighting": "twice"}, "alignment.weighting"),
        ({"pad_to": 0}, "alignment.pad_to"),
    ],
)
def test_bad_combinations_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        term(**kw)


def test_collate_pads_every_row_to_pad_to() -> None:
    rows = [{"input_ids": [5, 6, 7], "prompt_len": 1}, {"input_ids": [8, 9], "prompt_len": 1}]
    b = collate(rows, [0, 1], pad_id=0, pad_to=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, *[IGNORE_INDEX] * 3], [-100, 9, *[IGNORE_INDEX] * 4]]
    assert collate(rows, [0, 1], pad_id=0)["input_ids"].shape == (2, 3)  # default: the longest row
    with pytest.raises(ValueError, match="pad_to=2"):
        collate(rows, [0, 1], pad_id=0, pad_to=2)
