"""LoraHub (Huang et al. 2023): gradient-free composition of task LoRAs trained by this runner.

``python -m mtlora.train adapter=lorahub adapter.library=[RUN,...]`` (or ``adapter.library_glob=...``)
runs the ``lorahub`` procedure (:mod:`.procedure`) instead of gradient training. With K library LoRAs
``(A_i, B_i)`` (one per run dir, each a finished ``adapter.method=lora`` run of the same base model, rank, alpha and target modules) and
weights ``w ∈ [-b, b]^K`` (``adapter.weight_bound``, init 0), every adapted layer gets the **factor-wise**
composition (LoraHub's state-dict weighted sum, not ``Σ w_i B_i A_i``)::

    Â = Σ_i w_i A_i,   B̂ = Σ_i w_i B_i,   h = W0 x + s · B̂ Â x

and ``w`` minimises, with a Nevergrad optimizer (``NGOpt``, ``adapter.budget`` evaluations)::

    L(w) = CE̅(w) / n + l1 · (1/K) Σ_i |w_i|     (adapter.ce_norm: n_examples [code])
    L(w) = CE̅(w)     + l1 · (1/K) Σ_i |w_i|     (adapter.ce_norm: none)

``CE̅`` is the mean answer-token cross-entropy of the few-shot set (all its answer tokens pooled) and ``n``
its number of rows: ``adapter.fewshot_per_task`` rows of each task of the run's ``data`` mixture, drawn
without replacement from the task's train split with ``numpy.random.default_rng(cfg.seed)``. The released
``default_get_loss`` sums each batch's token-mean loss and divides by the number of examples; with its
default batch (all examples at once, as ``reproduce_bbh.py``'s batch of 5 for 5 examples) that is
``CE̅ / n``. Batching here (``eval.batch_size``) only bounds memory: the pooled mean does not depend on it.

Result (``adapter.result``): ``recommendation`` [code] — Nevergrad's ``provide_recommendation()`` after the
budget (what the released ``optimizer.minimize`` returns and loads); ``best_evaluated`` — the best point the
optimizer evaluated (w = 0, the base model, is evaluated first and is always a candidate). Both, with their
objective values, are recorded in ``metrics/lorahub.json``.

The run dir is a normal run dir: markers, config, ``meta.json``, ``base_model/``, and the composed LoRA as
``adapter/`` (so :func:`mtlora.load_run`, ``python -m mtlora.export`` and held-in eval work on it; the
registry maps ``adapter.method=lorahub`` to the plain LoRA layer), plus ``metrics/lorahub.json``.

Modules: :mod:`.library` (which runs, their checks, their stacked weights), :mod:`.compose` (composition,
few-shot objective, Nevergrad), :mod:`.procedure` (the run).
"""

from mtlora.procedures.lorahub.compose import (
    Objective,
    compose_factors,
    fewshot_batches,
    fewshot_ce,
    fewshot_rows,
    optimize,
    set_composition,
)
from mtlora.procedures.lorahub.library import (
    check_library_run,
    check_lorahub_config,
    load_library_weights,
    preflight_lorahub,
    resolve_library,
    sample_modules,
)
from mtlora.procedures.lorahub.procedure import LoraHubProcedure, compose_run

__all__ = [
    "LoraHubProcedure",
    "Objective",
    "check_library_run",
    "check_lorahub_config",
    "compose_factors",
    "compose_run",
    "fewshot_batches",
    "fewshot_ce",
    "fewshot_rows",
    "load_library_weights",
    "optimize",
    "preflight_lorahub",
    "resolve_library",
    "sample_modules",
    "set_composition",
]
