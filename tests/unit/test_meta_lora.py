"""MeTA-LoRA's meta step (mtlora.training.meta_lora) against independent computations on a toy LoRA model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtlora.adapters import inject_adapters
from mtlora.errors import ConfigError
from mtlora.training.meta_lora import MetaLearner, average_grads_across_processes

V, D = 11, 6


class Toy(nn.Module):
    """Embedding → linear to the vocabulary (LoRA-adapted); returns ``.logits`` like an HF model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def toy_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    m = Toy()
    cfg = OmegaConf.create(
        {
            "method": "lora",
            "rank": 2,
            "alpha": 4,
            "dropout": 0.0,
            "use_rslora": False,
            "target_modules": ["head"],
        }
    )
    inject_adapters(m, cfg)
    with torch.no_grad():  # non-zero B so that every factor gets a gradient
        m.head.lora_B.normal_(0, 0.3)
    return m


def toy_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (8, 5), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt that does not count
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "task_ids": torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]),  # interleaved: rows are picked by task id
    }


def rows_loss(model: nn.Module, batch: dict, rows: list[int]) -> torch.Tensor:
    """Mean answer-token CE of ``rows``, written out independently of mtlora's loss helpers."""
    logits = model(batch["input_ids"][rows], None).logits[:, :-1]
    labels = batch["labels"][rows][:, 1:]
    keep = labels != -100
    return nn.functional.cross_entropy(logits[keep], labels[keep])


def adapter_params(model: nn.Module) -> list[nn.Parameter]:
    return [model.head.lora_A, model.head.lora_B]


def sgd_adapted(model: nn.Module, batch: dict, rows: list[int], lr: float, steps: int) -> nn.Module:
    """A copy of ``model`` after ``steps`` plain SGD steps on ``rows`` (in-place updates, .backward())."""
    m = copy.deepcopy(model)
    for _ in range(steps):
        for p in adapter_params(m):
            p.grad = None
        rows_loss(m, batch, rows).backward()
        with torch.no_grad():
            for p in adapter_params(m):
                p -= lr * p.grad
    for p in adapter_params(m):
        p.grad = None
    return m


SUPPORT = {0: [0, 2], 1: [1, 3]}  # the first two rows of each task
QUERY = {0: [5, 7], 1: [4, 6]}
ALL = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}


def meta_grads(algorithm: str, steps: int = 2, lr: float = 0.3, scale: float = 1.0) -> list[torch.Tensor]:
    model, batch = toy_model(), toy_batch()
    learner = MetaLearner(algorithm=algorithm, inner_steps=steps, inner_lr=lr)
    learner.accumulate(model, batch, scale, step=0, micro=0)
    return [p.grad.clone() for p in adapter_params(model)]


def test_fomaml_gradient_is_the_query_gradient_at_the_adapted_parameters() -> None:
    model, batch = toy_model(), toy_batch()
    expected = [torch.zeros_like(p) for p in adapter_params(model)]
    for t in (0, 1):
        adapted = sgd_adapted(model, batch, SUPPORT[t], lr=0.3, steps=2)
        rows_loss(adapted, batch, QUERY[t]).backward()
        for e, p in zip(expected, adapter_params(adapted)):
            e += p.grad / 2
    for got, want in zip(meta_grads("fomaml", scale=1.0), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_reptile_pseudo_gradient_is_theta_minus_mean_adapted_theta() -> None:
    model, batch = toy_model(), toy_batch()
    adapted = [sgd_adapted(model, batch, ALL[t], lr=0.3, steps=2) for t in (0, 1)]
    expected = [
        p.detach() - (a0.detach() + a1.detach()) / 2
        for p, a0, a1 in zip(adapter_params(model), adapter_params(adapted[0]), adapter_params(adapted[1]))
    ]
    for got, want in zip(meta_grads("reptile"), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_maml_gradient_has_the_hessian_term() -> None:
    """One inner step: ∇_θ L_Q(θ − α∇L_S(θ)) = (I − α H_S(θ)) ∇L_Q(θ'), with the Hessian-vector product
    computed by torch.autograd.functional.hvp on a flat-parameter function."""
    model, batch = toy_model(), toy_batch()
    lr = 0.3
    shapes = [p.shape for p in adapter_params(model)]
    sizes = [p.numel() for p in adapter_params(model)]

    def loss_at(flat: torch.Tensor, rows: list[int]) -> torch.Tensor:
        a, b = (t.view(s) for t, s in zip(flat.split(sizes), shapes))
        h = model.emb(batch["input_ids"][rows])
        logits = model.head.base_layer(h) + (h @ a.T @ b.T) * model.head.scaling
        labels = batch["labels"][rows][:, 1:]
        keep = labels != -100
        return nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep])

    theta = torch.cat([p.detach().flatten() for p in adapter_params(model)])
    expected = torch.zeros_like(theta)
    for t in (0, 1):
        g_s = torch.autograd.functional.jacobian(lambda f, t=t: loss_at(f, SUPPORT[t]), theta)
        adapted = theta - lr * g_s
        g_q = torch.autograd.functional.jacobian(lambda f, t=t: loss_at(f, QUERY[t]), adapted)
        _, hv = torch.autograd.functional.hvp(lambda f, t=t: loss_at(f, SUPPORT[t]), theta, g_q)
        expected += (g_q - lr * hv) / 2
    got = torch.cat([g.flatten() for g in meta_grads("maml", steps=1, lr=lr)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    first_order = torch.cat([g.flatten() for g in meta_grads("fomaml", steps=1, lr=lr)])
    assert (got - first_order).abs().max() > 1e-4  # the second-order term is really there


def test_grads_accumulate_over_micro_batches_with_scale() -> None:
    once = meta_grads("fomaml", scale=1.0)
    model, batch = toy_model(), toy_batch()
    learner = MetaLearner(algorithm="fomaml", inner_steps=2, inner_lr=0.3)
    learner.accumulate(model, batch, 0.5, step=0, micro=0)
    learner.accumulate(model, batch, 0.5, step=0, micro=1)
    for got, want in zip((p.grad for p in adapter_params(model)), once):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_meta_step_leaves_the_parameters_unchanged() -> None:
    model, batch = toy_model(), toy_batch()
    before = [p.detach().clone() for p in adapter_params(model)]
    for algo in ("fomaml", "maml", "reptile"):
        MetaLearner(algorithm=algo, inner_steps=2, inner_lr=0.3).accumulate(model, batch, 1.0, 0, 0)
    for b, p in zip(before, adapter_params(model)):
        assert torch.equal(b, p.detach())


def test_logged_rows_are_the_query_rows_or_all_rows() -> None:
    model, batch = toy_model(), toy_batch()
    res = MetaLearner(algorithm="fomaml").accumulate(model, batch, 1.0, 0, 0)
    assert sorted(res.task_ids.tolist()) == [0, 0, 1, 1] and res.ce.shape == (4, 4)
    res = MetaLearner(algorithm="reptile").accumulate(model, batch, 1.0, 0, 0)
    assert sorted(res.task_ids.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_tasks_per_step_samples_a_seeded_subset() -> None:
    learner = MetaLearner(tasks_per_step=2, seed=3)
    ids = torch.arange(5).repeat(2)
    picks = {tuple(learner._tasks(ids, step, 0)) for step in range(20)}
    assert all(len(p) == 2 for p in picks) and len(picks) > 3
    assert learner._tasks(ids, 7, 1) == learner._tasks(ids, 7, 1)


def test_average_grads_across_processes_uses_the_mean_reduction() -> None:
    calls = []

    class FakeAccelerator:
        num_processes = 2

        def reduce(self, t, reduction):
            calls.append(reduction)
            return t * 10  # stands for the cross-process mean

    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    a.grad = torch.full((2,), 0.5)
    average_grads_across_processes([a, b], FakeAccelerator())
    assert calls == ["mean", "mean"]
    assert torch.equal(a.grad, torch.full((2,), 5.0)) and torch.equal(b.grad, torch.zeros(3))


@pytest.mark.parametrize(
    ("knobs", "key"),
    [
        ({"algorithm": "sgd"}, "adapter.meta.algorithm"),
        ({"inner_steps": 0}, "adapter.meta.inner_steps"),
        ({"inner_lr": -1.0}, "adapter.meta.inner_lr"),
        ({"support_rows": 0}, "adapter.meta.support_rows"),
        ({"tasks_per_step": True}, "adapter.meta.tasks_per_step"),
    ],
)
def test_bad_knobs_name_the_key(knobs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MetaLearner.from_config(OmegaConf.create(knobs))


def test_row_checks() -> None:
    learner = MetaLearner(support_rows=2)
    with pytest.raises(ConfigError, match="task_balanced"):
        learner.check_rows(None, 4)
    with pytest.raises(ConfigError, match="support_rows=2"):
        learner.check_rows(2, 4)
    learner.check_rows(3, 4)
    with pytest.raises(ConfigError, match="tasks_per_step=5"):
        MetaLearner(tasks_per_step=5).check_rows(4, 4)
    assert MetaLearner.from_config(None) is None
