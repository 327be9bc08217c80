"""The adapter contract: one table of cases over the adapter registry, each case through the same checks.

A case is a ``conf/adapter/*.yaml`` preset, the way a method is run; together the presets must select every
method of the registry (:mod:`mtlora.adapters.registry`), so a newly registered method is checked as soon
as it has its YAML and its init promise in :data:`INIT`. What a layer class declares is read from the
injected layers: ``mergeable``, ``per_task_mergeable`` (merge for one task) and ``needs_task_ids``
(task-aware); what the method's spec declares (``token_routed``, ``task_ids``) from the registry
(:func:`row_of`). The one fact no spec declares, how exactly the init reproduces the base model, is
:data:`INIT`, one entry per registered method. The checks are plain functions of a composed config, so a
method registered from outside the project (:func:`test_a_method_registered_from_outside_passes_the_contract`)
goes through the same ones.

Checks, on the tiny model in fp32 (forward also with bf16 base weights):

* forward: logits ``(B, L, V)`` in the model's dtype; every adapter layer is the registered class (or one
  the class places itself), keeps fp32 weights and returns its base layer's shape and dtype;
* init: logits equal the base model's where the row promises it, to the row's tolerance;
* gradients: the trainable parameters are exactly the adapter layers' own (``lora_*``), and a backward
  reaches every one of them;
* token routing: ``Δ(2x) = 2Δ(x)`` for the layers of a method without a token router, not with one;
* merge: mergeable → merged logits = unmerged (atol 1e-5) and unmerge restores the base weights (atol
  1e-6); merge per task → the same for each task, with no task ids once merged; else ``TypeError`` and
  nothing changes;
* save/load: the saved ``adapter_config.json`` and weights rebuild a model with identical logits;
* task ids: a task-aware method serves each row with its own id (a row alone = the row in a mixed batch),
  the id changes the row and missing ids raise; a method that routes by task in training only does so in
  train mode and ignores ids in eval; every other method ignores them.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtlora.adapters import (
    AdapterLayer,
    adapter_buffers,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from mtlora.adapters.registry import method_names, spec_of, unregister
from mtlora.adapters.state import ADAPTER_CONFIG
from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.models import build_model
from mtlora.procedures.finetune.recipe import run_training
from tests.helpers.adapter_yaml import unmarked_departures
from tests.helpers.compose import CONF, compose_train
from tests.helpers.tiny import inject, logits, randomise_adapters, tiny_config, tokens

#: the logits are bit-identical (the initial update is exactly zero: B = 0, or MultiLoRA's v = 0)
EXACT = 0.0
#: an offset cancels the initial update: the same product, computed in another order, in fp32
ROUNDING = 1e-5
#: merged vs unmerged logits (|logits| ≈ 5 on the tiny model; measured ≤ 5.5e-6), restored base weights
MERGE_ATOL, UNMERGE_ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class Init:
    """How a method's init reproduces the base model (the one fact its spec does not declare)."""

    #: max |logits - base logits| right after injection; None: the init does not promise the base output
    atol: float | None
    #: the init equals the base up to ROUNDING only while the router is uniform (R-LoRA's offset)
    exact_for_uniform_router: bool = False


INIT: dict[str, Init] = {
    "lora": Init(EXACT),  # B = 0
    "lorahub": Init(EXACT),  # a plain LoRA layer; the composition fills it later
    "dora": Init(EXACT),  # B = 0, m = ‖W0‖_row: c = 1 exactly
    "multilora": Init(EXACT),  # v_i = 0
    "lora_split": Init(EXACT),  # B = 0
    "hydralora": Init(EXACT),  # B_i = 0
    "mtlora": Init(EXACT),  # B_i = 0 (lowrank block style, component layers)
    "molora": Init(EXACT),  # B_i = 0
    "mtl_lora": Init(EXACT),  # B_j = 0
    "moelora": Init(EXACT),  # B_i = 0
    # random B_i, the offset c·Σ_i B_i(0)A(0) subtracted: exact up to rounding (no router)
    "mlora": Init(ROUNDING),
    # random B_i, the offset (1/N)·Σ_i B_i(0)A(0) subtracted: exact only while the router is uniform
    # (checked with the router zeroed, to ROUNDING). With the kaiming-init router the start is off by
    # s·Σ_i (ω_i(x) − 1/N)·B_i(0)A(0)x, small under the preset's init_scale=code (A·f^N, B_i·f^(N−i),
    # f = r^(1/4)/√γ ≈ 0.18): ≤ 1.0e-4 on the tiny model's logits over init seeds 0-2, hence 1e-3;
    # init_scale=paper puts it near 1.
    "rlora": Init(1e-3, exact_for_uniform_router=True),
}


@dataclass(frozen=True)
class Row:
    """A method's facts for the checks: its spec's declarations and its :class:`Init`."""

    #: max |logits - base logits| right after injection; None: the init does not promise the base output
    init_atol: float | None
    #: the update weights heads / experts by a router on each token's input (so it cannot merge)
    token_routed: bool = False
    #: the init equals the base up to ROUNDING only while the router is uniform (R-LoRA's offset)
    exact_for_uniform_router: bool = False
    #: rows are routed by their task id in training only (task ids optional in eval)
    task_routed_in_training: bool = False


def row_for(method: str, init: Init) -> Row:
    spec = spec_of(method)
    return Row(init.atol, spec.token_routed, init.exact_for_uniform_router, spec.task_ids == "training")


#: every preset of the adapter group is a case
CONFIGS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))
#: a mixed-task batch: three rows of tokens
ROWS_PER_BATCH = 3


def method_of(config: str) -> str:
    return str(tiny_config(config).adapter.method)


def row_of(config: str) -> Row:
    method = method_of(config)
    assert method in INIT, f"conf/adapter/{config}.yaml selects {method!r}, which has no entry in INIT"
    return row_for(method, INIT[method])


def num_tasks(cfg) -> int:
    """``adapter.num_tasks`` of task-aware presets, else the data mixture's number of tasks."""
    return int(cfg.adapter.get("num_tasks") or len(cfg.data.tasks))


def mixed_ids(cfg) -> torch.Tensor:
    t = num_tasks(cfg)
    assert t >= 2, "the contract needs a mixture of at least two tasks"
    return torch.tensor([0, t - 1, 1])


def one_kind(model: nn.Module) -> AdapterLayer:
    """A layer of ``model`` after checking that all its adapter layers declare the same facts."""
    layers = list(adapter_layers(model).values())
    facts = {(m.mergeable, m.per_task_mergeable, m.needs_task_ids) for m in layers}
    assert layers and len(facts) == 1, facts
    return layers[0]


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ---------------------------------------------------------------- the table covers the registry


def test_every_registered_method_has_an_init_entry_and_a_preset() -> None:
    methods = set(method_names())
    missing = sorted(methods - set(INIT))
    assert not missing, f"registered methods without an entry in INIT (add one): {missing}"
    assert not set(INIT) - methods, "INIT entries of methods that are not registered"
    selected = {method_of(c) for c in CONFIGS}
    assert selected <= methods, selected - methods
    unrun = sorted(methods - selected)
    assert not unrun, f"registered methods that no conf/adapter/*.yaml selects (add one): {unrun}"


def check_declarations(method: str, row: Row) -> None:
    """The layer class agrees with its spec: routing excludes merging and task ids, the class's spec is the
    method's (or the spec of the layer it reuses), ``needs_task_ids`` is the spec's ``task_ids=always``."""
    spec = spec_of(method)
    cls = spec.layer_class()
    assert issubclass(cls, AdapterLayer)
    assert cls.spec is not None and cls.spec.layer_class() is cls
    assert not (cls.mergeable and cls.per_task_mergeable)
    if row.token_routed:  # one weight cannot hold a per-token mixture
        assert not (cls.mergeable or cls.per_task_mergeable or cls.needs_task_ids)
    assert cls.needs_task_ids == spec.needs_task_ids
    assert not (row.task_routed_in_training and cls.needs_task_ids)
    assert not row.exact_for_uniform_router or row.token_routed
    assert set(cls.config_knobs()) <= {k.name for k in spec.knobs}


@pytest.mark.parametrize("method", sorted(INIT))
def test_class_agrees_with_its_spec(method: str) -> None:
    check_declarations(method, row_for(method, INIT[method]))


# ---------------------------------------------------------------- the checks, per preset


def injected_cfg(cfg: DictConfig, seed: int = 0, **adapter_overrides) -> tuple[nn.Module, DictConfig, object]:
    """``(model, cfg, context)``: the tiny model with ``cfg.adapter`` (a copy, ``adapter_overrides`` set)."""
    cfg = copy.deepcopy(cfg)
    for key, value in adapter_overrides.items():
        OmegaConf.update(cfg.adapter, key, value, merge=False)
    model, context = inject(cfg, seed)
    return model, cfg, context


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_shape_and_dtype(config: str, dtype: str) -> None:
    check_forward_shape_and_dtype(tiny_config(config), dtype)


def check_forward_shape_and_dtype(cfg: DictConfig, dtype: str) -> None:
    cfg = copy.deepcopy(cfg)
    cfg.model.dtype = dtype
    model, ctx = inject(cfg)
    randomise_adapters(model)
    layers = adapter_layers(model)
    cls = spec_of(cfg.adapter.method).layer_class()
    assert layers and ctx.num_layers == len(layers)
    for layer in layers.values():
        assert layer.context is ctx
        assert type(layer) is cls or hasattr(cls, "place_adapters"), type(layer)
        assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if n.startswith("lora"))
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, layer in layers.items():
        rec = seen.setdefault(name, {})
        for key, module in (("out", layer), ("base", layer.base_layer)):
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o, rec=rec, key=key: rec.__setitem__(
                        key, o[0] if isinstance(o, tuple) else o
                    )
                )
            )
    ids = tokens(rows=ROWS_PER_BATCH)
    out = logits(model, ids, mixed_ids(cfg))
    for h in hooks:
        h.remove()
    want = getattr(torch, dtype)
    assert out.shape == (*ids.shape, model.config.vocab_size) and out.dtype == want
    assert torch.isfinite(out).all()
    assert set(seen) == set(layers)
    for name, rec in seen.items():
        assert rec["out"].shape == rec["base"].shape and rec["out"].dtype == rec["base"].dtype == want, name


@pytest.mark.parametrize("config", CONFIGS)
def test_starts_equal_to_the_base_model(config: str) -> None:
    row = row_of(config)
    if row.init_atol is None:
        pytest.skip(f"{method_of(config)}'s init does not promise the base output")
    check_starts_equal_to_the_base_model(tiny_config(config), row)


def check_starts_equal_to_the_base_model(cfg: DictConfig, row: Row) -> None:
    ids, task_ids = tokens(rows=ROWS_PER_BATCH), mixed_ids(cfg)
    base = logits(build_model(cfg.model), ids)
    model, _ = inject(cfg)
    torch.testing.assert_close(logits(model, ids, task_ids), base, atol=row.init_atol, rtol=0)
    if row.exact_for_uniform_router:
        routers = [m.lora_router for m in adapter_layers(model).values()]
        assert routers
        with torch.no_grad():
            for r in routers:
                r.zero_()  # softmax of zero logits: every head weighs 1/N
        torch.testing.assert_close(logits(model, ids, task_ids), base, atol=ROUNDING, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_reach_exactly_the_adapter_parameters(config: str) -> None:
    check_gradients_reach_exactly_the_adapter_parameters(tiny_config(config))


def check_gradients_reach_exactly_the_adapter_parameters(cfg: DictConfig) -> None:
    model, cfg, ctx = injected_cfg(cfg)
    randomise_adapters(model)  # away from B = 0, where A's gradient vanishes
    own = {
        f"{name}.{pn}"
        for name, layer in adapter_layers(model).items()
        for pn, _ in layer.named_parameters()
        if not pn.startswith("base_layer.")
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == own
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n in own)
    model.train()
    ctx.begin(task_ids=mixed_ids(cfg))
    loss = model(input_ids=tokens(rows=ROWS_PER_BATCH)).logits.float().square().mean()
    aux = ctx.total_aux_loss()
    (loss if aux is None else loss + aux).backward()
    params = dict(model.named_parameters())
    unreached = sorted(n for n in trainable if params[n].grad is None or not params[n].grad.abs().max() > 0)
    assert not unreached
    assert all(p.grad is None for n, p in params.items() if n not in trainable)


@pytest.mark.parametrize("config", CONFIGS)
def test_token_routing_matches_the_row(config: str) -> None:
    check_token_routing(tiny_config(config), row_of(config))


def check_token_routing(cfg: DictConfig, row: Row) -> None:
    """A router on the token input makes the update non-linear in x; without one it is a linear map."""
    model, cfg, ctx = injected_cfg(cfg)
    randomise_adapters(model)
    model.eval()
    ctx.begin(task_ids=mixed_ids(cfg))
    routed = row.token_routed
    g = torch.Generator().manual_seed(0)
    for name, layer in adapter_layers(model).items():
        x = torch.randn(ROWS_PER_BATCH, 5, layer.in_features, generator=g)
        with torch.no_grad():
            once, twice = layer.delta(x), layer.delta(2 * x)
        gap = float((twice - 2 * once).abs().max() / once.abs().max())
        assert (gap > 1e-3) if routed else (gap < 1e-5), (name, gap)


@pytest.mark.parametrize("config", CONFIGS)
def test_merge_unmerge_round_trip(config: str) -> None:
    check_merge_unmerge_round_trip(tiny_config(config))


def check_merge_unmerge_round_trip(cfg: DictConfig) -> None:
    model, cfg, _ = injected_cfg(cfg)
    randomise_adapters(model)
    layer = one_kind(model)
    layers = adapter_layers(model).values()
    ids, task_ids = tokens(rows=ROWS_PER_BATCH), mixed_ids(cfg)
    w0 = frozen(model)
    want = logits(model, ids, task_ids)

    def restored() -> None:
        assert not any(m.merged for m in layers)
        for n, w in frozen(model).items():
            torch.testing.assert_close(w, w0[n], atol=UNMERGE_ATOL, rtol=0, msg=n)
        torch.testing.assert_close(logits(model, ids, task_ids), want, atol=MERGE_ATOL, rtol=MERGE_ATOL)

    if layer.mergeable:
        merge_adapters(model)
        assert all(m.merged for m in layers)
        torch.testing.assert_close(logits(model, ids, task_ids), want, atol=MERGE_ATOL, rtol=MERGE_ATOL)
        unmerge_adapters(model)
        restored()
    elif layer.per_task_mergeable:
        t_max = num_tasks(cfg) - 1
        for t in (0, t_max):
            want_t = logits(model, ids, torch.full_like(task_ids, t))
            merge_adapters(model, task_id=t)
            assert all(m.merged and m.merged_task == t for m in layers)
            # the merged weight serves task t alone: no task ids needed
            torch.testing.assert_close(logits(model, ids, None), want_t, atol=MERGE_ATOL, rtol=MERGE_ATOL)
            unmerge_adapters(model)
            restored()
    else:
        with pytest.raises(TypeError, match="cannot be merged"):
            merge_adapters(model)
        assert not any(m.merged for m in layers)
        assert all(torch.equal(w, w0[n]) for n, w in frozen(model).items())
        torch.testing.assert_close(logits(model, ids, task_ids), want, atol=0, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_round_trip(config: str, tmp_path: Path) -> None:
    check_save_load_round_trip(tiny_config(config), tmp_path)


def check_save_load_round_trip(cfg: DictConfig, tmp_path: Path) -> None:
    model, cfg, _ = injected_cfg(cfg, seed=0)
    randomise_adapters(model, seed=3)
    ids, task_ids = tokens(rows=ROWS_PER_BATCH), mixed_ids(cfg)
    want = logits(model, ids, task_ids)
    out = save_adapter(model, tmp_path / "adapter", OmegaConf.to_container(cfg.adapter, resolve=True))
    saved = adapter_state_dict(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable | set(adapter_buffers(model))
    # a model rebuilt from the saved config alone, with another init, moved elsewhere
    other = build_model(cfg.model)
    torch.manual_seed(1)
    inject_adapters(other, OmegaConf.create(json.loads((out / ADAPTER_CONFIG).read_text())))
    randomise_adapters(other, seed=4)
    assert (logits(other, ids, task_ids) - want).abs().max() > 1e-3
    load_adapter(other, out)
    got = adapter_state_dict(other)
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits(other, ids, task_ids), want, atol=0, rtol=0)


@torch.no_grad()
def forward(model: nn.Module, ids: torch.Tensor, task_ids: torch.Tensor | None, train: bool) -> torch.Tensor:
    model.train(train)
    model.adapter_context.begin(task_ids=task_ids)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("config", CONFIGS)
def test_task_ids_honoured_or_ignored(config: str) -> None:
    check_task_ids_honoured_or_ignored(tiny_config(config), row_of(config))


def check_task_ids_honoured_or_ignored(cfg: DictConfig, row: Row) -> None:
    model, cfg, _ = injected_cfg(cfg, dropout=0.0)  # train mode without dropout: deterministic
    randomise_adapters(model)
    task_aware = one_kind(model).needs_task_ids
    ids, task_ids = tokens(rows=ROWS_PER_BATCH), mixed_ids(cfg)
    moved = task_ids.clone()
    moved[0] = (moved[0] + 1) % num_tasks(cfg)
    for train in (False, True):
        out = forward(model, ids, task_ids, train)
        if task_aware or (row.task_routed_in_training and train):
            with pytest.raises(ValueError, match="needs task ids"):
                forward(model, ids, None, train)
            for r in range(len(ids)):  # each row with its own id, alone or in the mixed batch
                alone = forward(model, ids[r : r + 1], task_ids[r : r + 1], train)[0]
                torch.testing.assert_close(alone, out[r], atol=1e-5, rtol=1e-5)
            other = forward(model, ids, moved, train)
            assert (other[0] - out[0]).abs().max() > 1e-3, "row 0's task id does not matter"
            torch.testing.assert_close(other[1:], out[1:], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(forward(model, ids, None, train), out, atol=0, rtol=0)
            torch.testing.assert_close(forward(model, ids, moved, train), out, atol=0, rtol=0)


# ---------------------------------------------------------------- a method from outside the project

TOY_SPEC = '''
"""A toy method: LoRA with a learnable output gate g (h = W0 x + g·s·BA x)."""
from mtlora.adapters.registry import register
from mtlora.adapters.spec import MethodSpec, num_knob

TOY = register(
    MethodSpec(
        name="toy_gated_lora",
        layer="toy_gated_lora_layer:GatedLoraLinear",
        doc="LoRA with a learnable output gate",
        knobs=(num_knob("gate_init", 1.0, "initial value of the output gate g"),),
    )
)
'''

TOY_LAYER = """
import math

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.base import AdapterLayer
from mtlora.adapters.lora import lora_scaling
from toy_gated_lora import TOY


class GatedLoraLinear(AdapterLayer):
    mergeable = True
    spec = TOY

    def __init__(self, base_layer, name, context, rank, alpha, dropout=0.0, use_rslora=False, gate_init=None):
        super().__init__(base_layer, name, context)
        gate_init = self.resolve_knobs(name, rank=rank, gate_init=gate_init)["gate_init"]
        self.rank, self.scaling = rank, lora_scaling(alpha, rank, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.lora_gate = nn.Parameter(torch.full((1,), float(gate_init), device=dev))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x):
        z = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))
        self.capture("lora_A", z)
        return F.linear(z, self.lora_B.to(x.dtype)) * (self.scaling * self.lora_gate.to(x.dtype))

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * (self.scaling * self.lora_gate)
"""

TOY_YAML = """name: toy_gated_lora
method: toy_gated_lora
rank: 4
alpha: 8
dropout: 0.05
use_rslora: false
target_modules: [q_proj, v_proj]
gate_init: 1.0
"""


@pytest.fixture
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A method registered from a temporary module (spec + layer) with its YAML in a temporary config dir;
    yields the config dir, unregistered afterwards."""
    code = tmp_path / "plugin"
    code.mkdir()
    (code / "toy_gated_lora.py").write_text(TOY_SPEC)
    (code / "toy_gated_lora_layer.py").write_text(TOY_LAYER)
    conf = tmp_path / "conf" / "adapter"
    conf.mkdir(parents=True)
    (conf / "toy_gated_lora.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(code))
    importlib.import_module("toy_gated_lora")  # registers the method
    yield tmp_path / "conf"
    unregister("toy_gated_lora")
    for name in ("toy_gated_lora", "toy_gated_lora_layer"):
        sys.modules.pop(name, None)


def test_a_method_registered_from_outside_passes_the_contract(toy_method: Path, tmp_path: Path) -> None:
    """One spec, one layer and one YAML outside the project: the method composes, validates, trains a step and
    passes every check of the contract."""
    search = f"hydra.searchpath=[file://{toy_method}]"
    cfg = compose_train([search, "adapter=toy_gated_lora", "debug=smoke"])
    assert "toy_gated_lora" in method_names()
    validate_config(cfg)
    bad = compose_train([search, "adapter=toy_gated_lora", "adapter.gate_init=-1"])
    with pytest.raises(ConfigError, match=r"adapter.gate_init=-1: must be a number >= 0"):
        validate_config(bad)
    assert not unmarked_departures(toy_method / "adapter" / "toy_gated_lora.yaml", spec_of("toy_gated_lora"))
    row = row_for("toy_gated_lora", Init(EXACT))  # B = 0
    check_declarations("toy_gated_lora", row)
    for dtype in ("float32", "bfloat16"):
        check_forward_shape_and_dtype(cfg, dtype)
    check_starts_equal_to_the_base_model(cfg, row)
    check_gradients_reach_exactly_the_adapter_parameters(cfg)
    check_token_routing(cfg, row)
    check_merge_unmerge_round_trip(cfg)
    check_save_load_round_trip(cfg, tmp_path)
    check_task_ids_honoured_or_ignored(cfg, row)
    # a training step through the real loop
    run = tmp_path / "run"
    run.mkdir()
    overrides = [search, "adapter=toy_gated_lora", "debug=smoke", "train.max_steps=2", "eval=none"]
    run_training(compose_train([*overrides, "data.budget=32", "train.log_every=1"], run_dir=run), run)
    losses = [json.loads(line)["loss"] for line in (run / "metrics" / "train.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
