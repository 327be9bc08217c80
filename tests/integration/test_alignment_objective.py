"""The alignment term in the step's objective, as the released Align-LoRA trainer weighs it.

The released trainer accumulates the A outputs of all GA micro-batches of an optimizer step, compares the
tasks' per-position statistics over that window, and adds λ·mean_pairs once per accumulation cycle to one
micro-batch loss, which the Trainer divides by GA like every other: the step's objective gains
(λ/GA)·mean_pairs. Pinned here against a re-implementation of that arithmetic written in this file, on the
tiny model: one SGD step of the A-LoRA presets' settings moves the adapters by exactly the gradient of that
term (on top of the CE's); the default A-LoRA-K / A-LoRA-M jobs train.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from mtlora.config import validate_config
from mtlora.data.batching import rows_per_task
from mtlora.data.mixture import BatchStream
from mtlora.procedures.common import build_model_and_data
from mtlora.procedures.finetune.recipe import run_training
from mtlora.run.rundir import save_resolved_config
from mtlora.trained_run import load_run
from tests.helpers.compose import compose_train
from tests.helpers.training import logged, train_tiny

GA = 10
LAM = 0.2

# a preset's objective on the tiny model: 1 row of each of the 4 synthetic tasks per micro-batch x GA 10
# (the released layout), one plain SGD step of lr 1 so that the update is minus the gradient
PROBE = [
    "model=tiny",
    "model.max_seq_len=96",
    "data=synthetic",
    "data.budget=256",
    "eval.suites=[]",
    "eval.at_end=false",
    "logger=none",
    "train.max_steps=1",
    "train.log_every=1",
    "train.micro_batch_size=4",
    f"train.gradient_accumulation_steps={GA}",
    "train.precision=fp32",
    "train.gradient_checkpointing=false",
    "train.max_grad_norm=null",
    "train.warmup_ratio=0.0",
    "train.scheduler.name=constant",
    "train.optimizer._target_=torch.optim.SGD",
    "~train.optimizer.betas",
    "~train.optimizer.eps",
    "train.optimizer.lr=1.0",
    "adapter.dropout=0.0",
]


def _sym_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½(KL(p_x‖p_y) + KL(p_y‖p_x)) of diagonal Gaussians fitted per (position, dim) over dim 0 of ``(n, S, r)``
    (unbiased variances + 1e-8), summed over r, averaged over S; in float64."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    vx = ((x - mx) ** 2).sum(0) / (x.shape[0] - 1) + 1e-8
    vy = ((y - my) ** 2).sum(0) / (y.shape[0] - 1) + 1e-8
    kl_xy = 0.5 * (torch.log(vy / vx) + vx / vy + (mx - my) ** 2 / vy - 1).sum(-1)
    kl_yx = 0.5 * (torch.log(vx / vy) + vy / vx + (mx - my) ** 2 / vx - 1).sum(-1)
    return (0.5 * (kl_xy + kl_yx)).mean()


def _mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD² per position with k(u,v) = Σ_σ exp(-‖u-v‖²/(2σ)) over the released code's 19 σ, averaged."""
    sig = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6]

    def k(a, b):  # (n, S, r), (m, S, r) -> (n, m, S)
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(torch.exp(-d / (2 * s)) for s in sig)

    x, y = x.double(), y.double()
    return (k(x, x).mean((0, 1)) + k(y, y).mean((0, 1)) - 2 * k(x, y).mean((0, 1))).mean()


def _window_term(cfg, metric: str, pool: str):
    """(model at the run's init, (λ/GA)·mean_layers mean_pairs D over the first step's per-task rows, D's value)
    computed from the inputs of every adapted layer: z = x·Aᵀ (dropout 0), every row right-padded to 512
    positions; ``pool``: none (per position, pads included) or masked_mean (mean over the real tokens)."""
    torch.manual_seed(int(cfg.seed))  # as the loop: seed, then build
    _, model, data = build_model_and_data(cfg)
    model.train()
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.Parameter)]
    inputs: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs[id(m)].append(args[0])) for m in layers]
    stream = BatchStream(data.schedule, int(cfg.train.micro_batch_size), 0, 1, rows_per_task(cfg))
    it = stream.iterate()
    task_ids, masks = [], []
    for _ in range(GA):
        pairs = next(it)[2]
        ids = [int(t) for t, _ in pairs]
        rows = [data.train[int(t)][int(i)] for t, i in pairs]
        input_ids = torch.full((len(rows), 512), data.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), 512), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[j, : len(r["input_ids"])] = 1
        model.adapter_context.begin(task_ids=torch.tensor(ids), capture=False)
        model(input_ids=input_ids, attention_mask=mask)
        task_ids += ids
        masks.append(mask)
    for h in hooks:
        h.remove()
    ids, mask = torch.tensor(task_ids), torch.cat(masks).double()
    metric_fn = _sym_kl if metric == "kl" else _mmd
    per_layer = []
    for m in layers:
        z = torch.cat(inputs[id(m)]).double() @ m.lora_A.T.double()  # (GA x 4 rows, 512, r)
        if pool == "masked_mean":
            z = ((z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))[:, None, :]  # (rows, 1, r)
        groups = [z[ids == t] for t in sorted(set(task_ids))]
        assert all(len(g) == GA for g in groups)  # 10 rows of every task in the window
        per_layer.append(torch.stack([metric_fn(a, b) for a, b in itertools.combinations(groups, 2)]).mean())
    value = torch.stack(per_layer).mean()
    return model, LAM / GA * value, float(value.detach())


def _runs(tmp_path: Path, preset: str, extra: list[str]) -> dict[str, Path]:
    """One SGD step of ``preset`` on the tiny model with its alignment weight (``on``) and with 0 (``off``)."""
    runs = {}
    for name, weight in (("on", LAM), ("off", 0.0)):
        d = tmp_path / name
        d.mkdir()
        cfg = compose_train([f"experiment={preset}", *PROBE, *extra, f"alignment.weight={weight}"], run_dir=d)
        validate_config(cfg)
        save_resolved_config(cfg, d)
        run_training(cfg, d)
        runs[name] = d
    return runs


# KL at every position: rows of a synthetic task share their prompt's first tokens, which give those
# positions the same features in every row (dropout 0 here), a variance of ε=1e-8 and fp32 gradients that
# are rounding noise; the gradient is pinned with the per-row mean (masked_mean) there, the per-position
# value in the next test
@pytest.mark.parametrize(
    ("preset", "metric", "pool"),
    [("align_lora/t4/a_lora_k", "kl", "masked_mean"), ("align_lora/t4/a_lora_m", "mmd", "none")],
)
def test_preset_step_objective_adds_lambda_over_ga_times_the_mean_over_task_pairs(
    tmp_path: Path, preset: str, metric: str, pool: str
) -> None:
    """One SGD step (lr 1) with the preset's alignment minus one with weight 0 moves every adapter weight by
    -∇[(λ/GA)·mean_pairs D] of the re-implemented window statistic (10 rows per task, GA 10); the logged
    alignment loss is that D."""
    runs = _runs(tmp_path, preset, [f"alignment.pool={pool}"])
    cfg = compose_train([f"experiment={preset}", *PROBE], run_dir=runs["on"])
    assert (cfg.alignment.window, cfg.alignment.weighting, cfg.alignment.pad_to) == ("step", "code", 512)
    model, term, value = _window_term(cfg, metric, pool)
    term.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # weights no A output depends on (the last layer's down_proj B) get no gradient from the term: 0
    want = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for n, p in params])
    after = {k: dict(load_run(d, allow_incomplete=True)[0].named_parameters()) for k, d in runs.items()}
    # θ_off - θ_on = (g_CE + g_align) - g_CE
    got = torch.cat([(after["off"][n] - after["on"][n]).detach().flatten() for n, _ in params])
    assert want.norm() > 0
    torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert logged(runs["on"], "align_loss")[0] == pytest.approx(value, rel=1e-5)


def test_preset_kl_statistics_are_per_position_over_rows_padded_to_512(tmp_path: Path) -> None:
    """A-LoRA-K's logged window statistic is the symmetric KL per position over all 512 positions of rows
    right-padded to 512 (pad positions included), as the released code computes it."""
    d = tmp_path / "run"
    d.mkdir()
    cfg = compose_train(["experiment=align_lora/t4/a_lora_k", *PROBE], run_dir=d)
    assert cfg.alignment.pool == "none"
    run_training(cfg, d)
    _, _, value = _window_term(cfg, "kl", "none")
    assert logged(d, "align_loss")[0] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("adapter", ["align_kl", "align_mmd"])
def test_default_alignment_jobs_train(tmp_path: Path, adapter: str) -> None:
    """`python -m mtlora.train adapter=align_kl|align_mmd` as configured (tiny model, 4 synthetic tasks,
    micro-batch 8, the adapter's GA 5): accepted by the checks, the loss falls, the alignment loss stays
    finite and the gradient norm bounded."""
    over = [f"adapter={adapter}", "eval=none", "logger=none", "train.max_steps=12", "train.log_every=1"]
    cfg = compose_train(over, run_dir=tmp_path)
    validate_config(cfg)  # not refused by the row floor
    assert (cfg.alignment.window, cfg.train.gradient_accumulation_steps, rows_per_task(cfg)) == ("step", 5, 2)
    d = train_tiny(tmp_path, "run", over)
    loss, align, norm = logged(d), logged(d, "align_loss"), logged(d, "grad_norm")
    assert all(math.isfinite(x) for x in loss + align + norm), (loss, align, norm)
    assert loss[-1] < loss[0] - 1.0, loss
    assert max(norm) < 10.0, norm
