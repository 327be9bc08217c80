"""Every paper preset trains (``scripts/preset_health.py``): in smoke form on the tiny model (synthetic data,
fp32, 30 steps, one learning rate; the preset's adapter, alignment loss, routing, procedure and batch
structure) its answer-token loss falls by at least 0.7 x a plain LoRA's under the same batch settings, its
auxiliary losses stay finite and its gradient norm finite and within 100 x LoRA's largest. LoraHub presets
are gradient-free: their composition must beat the base model. Base rows train nothing (not listed here;
``tests/unit/test_preset_health.py`` checks that the script skips them).

Slow (references and identical smoke forms are trained once per module): ``make test-full`` runs it, and
``make preset-health`` runs the script with its table.
"""

from __future__ import annotations

import pytest

from tests.helpers.scripts import load_script

health = load_script("preset_health")
TRAINED = [p for p in health.list_presets() if not p.endswith("/base")]


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory):
    return health.Checker(tmp_path_factory.mktemp("preset_health"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", TRAINED)
def test_preset_trains_in_smoke_form(preset: str, checker) -> None:
    with health.quiet_progress_bars():
        row = checker.check(preset)
    assert row.verdict == "PASS", (
        f"{preset}: {row.reason} (loss fall {row.fall}, LoRA's {row.ref_fall}; max gradient norm "
        f"{row.max_grad_norm}, LoRA's {row.ref_max_grad_norm}; max auxiliary loss {row.max_aux})"
    )
