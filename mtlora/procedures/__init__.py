"""Procedures: what a run does with its config (:mod:`.registry`), over shared components.

* ``finetune`` (:mod:`.finetune`): gradient fine-tuning as a recipe (setup / train / save / cleanup) whose
  optimizer step is a strategy chosen once at setup (plain, alignment window, MeTA-LoRA meta step);
* ``lorahub`` (:mod:`.lorahub`): gradient-free composition of finished LoRA runs (``adapter=lorahub``).

Both build the model and data, write their outputs and run the end-of-run suites through :mod:`.common`.
Importing this package loads no torch.
"""

from mtlora.procedures.registry import (
    DEFAULT,
    PROCEDURES,
    Procedure,
    ProcedureSpec,
    get_procedure,
    procedure_for,
    register,
)

__all__ = [
    "DEFAULT",
    "PROCEDURES",
    "Procedure",
    "ProcedureSpec",
    "get_procedure",
    "procedure_for",
    "register",
]
