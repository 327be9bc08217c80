"""Resumable checkpoints: an interrupted-and-resumed run continues exactly like the uninterrupted one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import get_scheduler

from mtlora.adapters import adapter_state_dict, inject_adapters
from mtlora.errors import ConfigError
from mtlora.models import build_model
from mtlora.training.checkpoint import (
    TRAINER_STATE,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from tests.helpers.compose import compose_train

TOTAL_STEPS = 10


@pytest.fixture(scope="module")
def cfg():
    cfg = compose_train(["debug=smoke"])
    assert cfg.adapter.dropout > 0  # dropout draws from the RNG: the resume must restore it
    return cfg


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return [torch.randint(3, 259, (4, 16), generator=g) for _ in range(n)]


def setup(cfg, lr_seed: int = 0):
    """Fresh model + LoRA + AdamW + transformers cosine schedule (warmup 2 of TOTAL_STEPS)."""
    torch.manual_seed(lr_seed)
    model = build_model(cfg.model)
    inject_adapters(model, cfg.adapter)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.999), weight_decay=0.01)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=TOTAL_STEPS)
    return model, opt, sched


def train_step(model, opt, sched, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_identically(cfg, tmp_path: Path, monkeypatch) -> None:
    data = batches(5)
    model, opt, sched = setup(cfg)
    first = [train_step(model, opt, sched, data[i]) for i in range(3)]
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    trainer_state = {"step": 3, "data_position": [0, 3], "note": "x"}
    rank_state = {"interval": {"steps": 1, "loss_sum": 2.5, "tokens": 7}}
    save_checkpoint(ckpt, model, opt, sched, trainer_state, rank=0, is_main=True, rank_state=rank_state)
    rng_at_save = torch.get_rng_state()
    lr_at_save = sched.get_last_lr()
    cont = [train_step(model, opt, sched, data[i]) for i in (3, 4)]
    final_weights = snapshot(model)
    final_lr = sched.get_last_lr()

    # the checkpoint holds only safetensors and JSON, and the .tmp dir is gone
    files = sorted(p.name for p in ckpt.iterdir())
    assert files and all(f.endswith((".safetensors", ".json")) for f in files), files
    assert {
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng_rank0.safetensors",
        "rng_rank0.json",
        TRAINER_STATE,
    } <= set(files)
    assert not ckpt.with_name("step_3.tmp").exists()

    # a fresh process: new objects with a different seed (so adapter init differs), RNG moved on
    model2, opt2, sched2 = setup(cfg, lr_seed=123)
    torch.rand(1000)
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(model2).values(), final_weights.values()))

    def no_unpickling(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    state = load_checkpoint(ckpt, model2, opt2, sched2, rank=0)
    monkeypatch.undo()

    assert state == {**trainer_state, "rank_state": rank_state}
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert sched2.get_last_lr() == lr_at_save
    assert sched2.last_epoch == 3
    resumed = [train_step(model2, opt2, sched2, data[i]) for i in (3, 4)]
    assert resumed == cont  # bit-identical losses
    assert_same_weights(snapshot(model2), final_weights)
    assert sched2.get_last_lr() == final_lr

    # the losses are not trivially equal: training moves them, and a fresh (unloaded) run differs
    assert len(set(first + cont)) == 5
    model3, opt3, sched3 = setup(cfg)
    assert [train_step(model3, opt3, sched3, data[i]) for i in (3, 4)] != cont


def test_optimizer_state_restored(cfg, tmp_path: Path) -> None:
    data = batches(2)
    model, opt, sched = setup(cfg)
    for ids in data:
        train_step(model, opt, sched, ids)
    ckpt = tmp_path / "checkpoints" / "step_2"
    save_checkpoint(ckpt, model, opt, sched, {"step": 2}, rank=0, is_main=True)
    model2, opt2, sched2 = setup(cfg, lr_seed=7)
    load_checkpoint(ckpt, model2, opt2, sched2, rank=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k]), (pid, k)
    assert [g["lr"] for g in s1["param_groups"]] == [g["lr"] for g in s2["param_groups"]]
    meta = json.loads((ckpt / "optimizer.json").read_text())
    assert meta["param_groups"][0]["weight_decay"] == 0.01


def make_ckpt(run_dir: Path, step: int) -> Path:
    d = run_dir / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    (d / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return d


def test_list_checkpoints_ignores_tmp_and_incomplete(tmp_path: Path) -> None:
    run = tmp_path / "run"
    c2, c10 = make_ckpt(run, 2), make_ckpt(run, 10)
    tmp = run / "checkpoints" / "step_12.tmp"
    tmp.mkdir()
    (tmp / TRAINER_STATE).write_text("{}")  # a killed save: complete-looking but never renamed
    (run / "checkpoints" / "step_11").mkdir()  # no trainer_state.json: incomplete
    for stray in ("step_best", "step_99_copy"):  # user dirs: neither a crash nor taken for a step
        make_ckpt(run, 0).rename(run / "checkpoints" / stray)
    assert list_checkpoints(run) == [c2, c10]  # numeric order: 10 after 2
    assert resolve_resume("auto", run) == c10
    assert resolve_resume(str(run), tmp_path / "other") == c10
    assert resolve_resume(str(c2), tmp_path / "other") == c2


def test_resolve_resume_none_auto_and_bad_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert resolve_resume(None, run) is None
    assert resolve_resume("auto", run) is None
    (run / "checkpoints" / "step_5.tmp").mkdir(parents=True)
    assert resolve_resume("auto", run) is None
    with pytest.raises(FileNotFoundError, match="resume"):
        resolve_resume(str(tmp_path / "does_not_exist"), run)
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(run), tmp_path / "elsewhere")  # a run dir with no checkpoint


def test_prune_keeps_newest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for s in (1, 2, 3, 20):
        make_ckpt(run, s)
    prune_checkpoints(run, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step_3", "step_20"]


def test_save_overwrites_existing_and_stale_tmp(cfg, tmp_path: Path) -> None:
    model, opt, sched = setup(cfg)
    ckpt = tmp_path / "checkpoints" / "step_1"
    stale = ckpt.with_name("step_1.tmp")
    stale.mkdir(parents=True)
    (stale / "junk.bin").write_bytes(b"x")
    save_checkpoint(ckpt, model, opt, sched, {"step": 1}, rank=0, is_main=True)
    save_checkpoint(ckpt, model, opt, sched, {"step": 1, "again": True}, rank=0, is_main=True)
    assert not stale.exists()
    assert "junk.bin" not in {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / TRAINER_STATE).read_text())["again"] is True


class _Engine:
    """Records DeepSpeed engine checkpoint calls (the real engine: tests/integration/test_deepspeed_training)."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []

    def save_checkpoint(self, save_dir, tag, **kw):
        self.calls.append(("save", tag, kw))
        (Path(save_dir) / tag).mkdir()

    def load_checkpoint(self, load_dir, tag, **kw):
        self.calls.append(("load", tag, kw))
        return str(Path(load_dir) / tag), {}


def test_deepspeed_checkpoint_holds_the_engine_state_and_is_refused_without_it(cfg, tmp_path: Path) -> None:
    model, opt, sched = setup(cfg)
    engine = _Engine()
    ds_ckpt = tmp_path / "ds" / "step_1"
    save_checkpoint(ds_ckpt, model, opt, sched, {"step": 1}, rank=0, is_main=True, engine=engine)
    assert engine.calls == [("save", "deepspeed", {"exclude_frozen_parameters": True, "save_latest": False})]
    assert (ds_ckpt / "adapter_model.safetensors").exists() and not (ds_ckpt / "optimizer.json").exists()
    load_checkpoint(ds_ckpt, model, opt, sched, rank=0, engine=engine)
    assert engine.calls[-1][:2] == ("load", "deepspeed") and engine.calls[-1][2]["load_optimizer_states"]
    with pytest.raises(FileNotFoundError, match="DeepSpeed hardware preset"):
        load_checkpoint(ds_ckpt, model, opt, sched, rank=0)
    # DeepSpeed restores unnamed flat partitions: an adapter that does not fit is refused before it loads
    calls = len(engine.calls)
    other, opt_o, sched_o = setup(compose_train(["debug=smoke", "adapter.rank=4"]))
    with pytest.raises(ConfigError, match="shape"):
        load_checkpoint(ds_ckpt, other, opt_o, sched_o, rank=0, engine=engine)
    assert len(engine.calls) == calls
    plain = tmp_path / "plain" / "step_1"
    save_checkpoint(plain, model, opt, sched, {"step": 1}, rank=0, is_main=True)
    with pytest.raises(FileNotFoundError, match="saved without DeepSpeed"):
        load_checkpoint(plain, model, opt, sched, rank=0, engine=engine)
