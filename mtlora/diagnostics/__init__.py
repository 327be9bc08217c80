"""Diagnostics of the papers (``docs/methods.md`` §10), during training and on saved runs.

One module per diagnostic, each with pure functions that take a model (and batches) and return plain
dicts/arrays: :mod:`.heads` (inter-head similarity), :mod:`.conflict` (per-task gradient conflict),
:mod:`.spectral` (SV spectra, mtLoRA's SV-band cross-expert alignment and SV importance), :mod:`.routing`
(routing entropy, expert-usage CV², mean routing weights per task), :mod:`.divergence` (KL / MMD between
the tasks' A-space representations), :mod:`.tsne` (2-D embeddings of parameters and representations) and
:mod:`.diagnostic_plots`. :mod:`.runner` runs the configured set (``diagnostics=`` config group) on a schedule;
``python -m mtlora.diagnose run_dir=R`` runs it on a saved run; :mod:`.compare`
(``python -m mtlora.diagnostics.compare RUN_A RUN_B ...``) compares runs like with like.
"""

from mtlora.diagnostics.config import DIAGNOSTICS, check_diagnostics_config

__all__ = ["DIAGNOSTICS", "DiagnosticsRunner", "check_diagnostics_config"]


def __getattr__(name: str):
    if name == "DiagnosticsRunner":  # imported lazily: the runner pulls in torch models and matplotlib
        from mtlora.diagnostics.runner import DiagnosticsRunner

        return DiagnosticsRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
