"""The method specs (:mod:`mtlora.adapters.spec`, :mod:`mtlora.adapters.methods`): one source of knob defaults,
checks and validation, torch-free, and the YAML presets agree with them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from mtlora.adapters.context import AdapterContext
from mtlora.adapters.registry import all_specs, get_spec, method_names, spec_of
from mtlora.adapters.spec import Knob, choice_knob, int_knob, num_knob
from mtlora.config import validate_config
from mtlora.errors import ConfigError
from tests.helpers.adapter_yaml import OVERRIDE, unmarked_departures
from tests.helpers.compose import CONF, REPO, compose_train
from tests.helpers.tiny import tiny_config

PRESETS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))


def test_registry_and_specs_load_no_torch() -> None:
    code = (
        "import sys; import mtlora.adapters.registry as r; r.discover(); import mtlora.adapters.spec; "
        "assert r.method_names(), 'no method'; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')); "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_spec_defaults_pass_their_own_checks_and_every_knob_is_documented(spec) -> None:
    assert spec.doc and all(k.doc for k in spec.knobs), spec.name
    assert spec.errors({**spec.defaults, **dict.fromkeys(spec.required_keys, 2)}) == []
    assert len(spec.errors(spec.defaults)) == len(spec.required_keys)  # "missing", one per required knob
    assert len({k.name for k in spec.knobs}) == len(spec.knobs)
    cls = spec.layer_class()
    assert cls.spec is not None and cls.spec.layer_class() is cls


@pytest.mark.parametrize("preset", PRESETS)
def test_adapter_yaml_restates_the_spec_defaults_or_marks_an_override(preset: str) -> None:
    method = tiny_config(preset).adapter.method
    assert not unmarked_departures(CONF / "adapter" / f"{preset}.yaml", spec_of(method))


def test_an_unmarked_departure_from_the_default_is_found(tmp_path: Path) -> None:
    spec = spec_of("mtlora")
    p = tmp_path / "x.yaml"
    p.write_text("method: mtlora\n# g = 2\nrouting_groups: 2\nspectral:\n  every_steps: 500\n  lambda: 0.5\n")
    assert unmarked_departures(p, spec) == [
        "x.yaml: routing_groups=2 differs from the spec default 1",
        "x.yaml: spectral.lambda=0.5 differs from the spec default 1.0",
    ]
    p.write_text(f"routing_groups: 2  # {OVERRIDE}\nspectral:\n  # {OVERRIDE} Dolly\n  lambda: 0.5\n")
    assert unmarked_departures(p, spec) == []


def test_knob_rules_by_hand() -> None:
    k = int_knob("n", 3, "doc", lo=1, nullable=True)
    assert k.allowed() == "an integer >= 1 (or null)"
    assert [k.problem(v, {}) for v in (1, None, 0, True, 1.0)] == [
        None,
        None,
        k.allowed(),
        k.allowed(),
        k.allowed(),
    ]
    x = num_knob("x", 0.1, "doc", lo_open=True)
    assert x.allowed() == "a number > 0" and x.problem(0, {}) and x.problem(1e-9, {}) is None
    c = choice_knob("c", "a", ("a", "b"), "doc")
    assert c.allowed() == "one of ['a', 'b']" and c.problem("z", {}) and c.problem("b", {}) is None
    with pytest.raises(ValueError, match="kind"):
        Knob("k", 0, "doc", kind="float")


def test_the_same_key_gets_its_own_methods_rule(tmp_path: Path) -> None:
    """dropout_place: A_out_per_head is a HydraLoRA placement, not a MOELoRA one (its input only)."""
    validate_config(compose_train(["adapter=hydralora", "adapter.dropout_place=A_out_per_head"]))
    with pytest.raises(
        ConfigError, match=r"adapter.dropout_place='A_out_per_head': must be one of \['input_"
    ):
        validate_config(compose_train(["adapter=moelora", "adapter.dropout_place=A_out_per_head"]))
    # MOELoRA splits its rank over the experts, MoLoRA's experts each have the full rank
    validate_config(compose_train(["adapter=molora", "adapter.rank=6", "adapter.num_experts=4"]))
    with pytest.raises(ConfigError, match=r"adapter.rank=6: must be a multiple of adapter.num_experts=4"):
        validate_config(compose_train(["adapter=moelora", "adapter.rank=6", "adapter.num_experts=4"]))


def test_a_knob_of_another_method_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"adapter.top_k=2: not a knob of adapter.method=hydralora"):
        validate_config(compose_train(["adapter=hydralora", "+adapter.top_k=2"]))


def test_the_renamed_balance_knob_is_refused_naming_the_new_one() -> None:
    """mtLoRA's BLC weight is balance_weight, as MoLoRA's (the same cv² loss); blc_alpha is refused."""
    assert spec_of("mtlora").defaults["balance_weight"] == 0.01
    assert spec_of("molora").defaults["balance_weight"] == 0.0
    with pytest.raises(ConfigError) as e:
        validate_config(compose_train(["adapter=mtlora", "+adapter.blc_alpha=0.1"]))
    assert "adapter.blc_alpha: renamed to adapter.balance_weight; set adapter.balance_weight instead" in str(
        e.value
    )
    with pytest.raises(ConfigError, match=r"adapter.balance_weight=-1: must be a number >= 0"):
        validate_config(compose_train(["adapter=mtlora", "adapter.balance_weight=-1"]))


def test_the_layer_refuses_what_validation_refuses_naming_the_layer() -> None:
    cls = spec_of("moelora").layer_class()
    with pytest.raises(ConfigError, match=r"adapter.task_embedding_rows='x' \(q\): must be one of"):
        cls(nn.Linear(8, 8), "q", AdapterContext(), rank=4, alpha=8, num_tasks=2, task_embedding_rows="x")
    layer = cls(nn.Linear(8, 8), "q", AdapterContext(), rank=4, alpha=8, num_tasks=2)
    assert (layer.num_experts, layer.task_embed_dim) == (4, 64)  # the spec's defaults


def test_capabilities_replace_name_branches() -> None:
    names = set(method_names())
    routed = {s.name for s in all_specs() if s.token_routed}
    assert routed == {"hydralora", "rlora", "mtlora", "molora"}
    assert {s.name for s in all_specs() if s.needs_task_ids} == {"mtl_lora", "moelora"}
    assert {s.name for s in all_specs() if s.peft_form} == {"lora", "lorahub", "dora", "mlora"}
    assert {s.name for s in all_specs() if s.rank_rule == "per_head"} == {
        "hydralora",
        "rlora",
        "mlora",
        "mtlora",
        "multilora",
        "molora",
    }
    assert spec_of("moelora").packing_problem({}).startswith("adapter.method=moelora routes by task")
    assert spec_of("lora_split").packing_problem({"split_routing": "none"}) is None
    assert "split_routing=task" in spec_of("lora_split").packing_problem({})
    assert spec_of("lora").packing_problem({}) is None
    assert get_spec("no_such_method") is None and "lora" in names
    with pytest.raises(ConfigError, match=r"adapter.method='nope': allowed values are \["):
        spec_of("nope")


def test_adapter_modules_import_without_cycles() -> None:
    """No module of mtlora.adapters reaches itself again through imports (top-level or inside functions); the
    package ``__init__`` loads its names lazily and is left out."""
    import ast

    root = REPO / "mtlora" / "adapters"
    graph: dict[str, set[str]] = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtlora.adapters."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("mtlora.adapters.")}
        graph[name] = deps
    graph = {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}

    def reaches(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    assert [m for m in sorted(graph) if reaches(m)] == []
