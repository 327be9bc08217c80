"""DoRA (Liu et al., ICML 2024; ``docs/methods.md`` §8)."""

from __future__ import annotations

from mtlora.adapters.registry import register
from mtlora.adapters.spec import MethodSpec, bool_knob

DORA = register(
    MethodSpec(
        name="dora",
        layer="mtlora.adapters.dora:DoraLinear",
        doc="DoRA: W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_row",
        knobs=(
            bool_knob(
                "detach_norm",
                True,
                "treat ‖W0 + sBA‖_row as a constant in backward (paper §4.3, official code, peft)",
            ),
        ),
        peft_form="dora",
    )
)
