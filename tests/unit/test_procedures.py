"""The procedure registry (mtlora.procedures) and the fine-tuning step chosen at setup."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from mtlora.data.build import rows_per_task
from mtlora.errors import ConfigError
from mtlora.procedures import DEFAULT, PROCEDURES, ProcedureSpec, procedure_for, register
from mtlora.utils.paths import REPO_ROOT
from tests.helpers.compose import compose_train

ADAPTER_METHODS = sorted(p.stem for p in (REPO_ROOT / "conf" / "adapter").glob("*.yaml"))


def test_the_registry_loads_no_torch() -> None:
    code = "import sys, mtlora.procedures as p; p.procedure_for; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_lorahub_composes_and_every_other_method_fine_tunes(method: str) -> None:
    cfg = OmegaConf.create({"adapter": {"method": method}})
    assert procedure_for(cfg).name == ("lorahub" if method == "lorahub" else DEFAULT)


def test_the_composed_lorahub_preset_selects_lorahub_which_runs_in_this_process() -> None:
    spec = procedure_for(compose_train(["adapter=lorahub"]))
    assert spec.name == "lorahub" and not spec.workers
    assert procedure_for(compose_train([])).workers  # fine-tuning runs in the launched workers


@pytest.mark.parametrize("name", sorted(PROCEDURES))
def test_every_registered_factory_and_preflight_resolves(name: str) -> None:
    from mtlora.procedures.registry import _load

    spec = PROCEDURES[name]
    assert callable(_load(spec.factory))
    if spec.preflight is not None:
        assert callable(_load(spec.preflight))


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(ProcedureSpec(name="lorahub", factory="x:y"))


def _step(overrides: list[str]):
    from mtlora.procedures.finetune.steps import choose_step

    cfg = compose_train(["debug=smoke", *overrides])
    return choose_step(cfg, rows_per_task(cfg), len(cfg.data.get("select") or cfg.data.tasks), 1)


def test_the_step_strategy_follows_the_config() -> None:
    from mtlora.procedures.finetune.steps import AlignmentStep, MetaStep, PlainStep

    assert type(_step([])) is PlainStep
    align = _step(["adapter=align_kl"])
    assert type(align) is AlignmentStep and align.capture and align.align.metric == "kl"
    assert type(_step(["adapter=meta_lora"])) is MetaStep


def test_meta_step_and_alignment_cannot_be_combined() -> None:
    with pytest.raises(ConfigError, match="adapter.meta and alignment"):
        _step(["adapter=meta_lora", "alignment=kl"])
