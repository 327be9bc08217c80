"""``python -m mtlora.evaluate``: run the evaluation suites of ``eval=`` on a finished run or a base model.

Composes the same config as ``python -m mtlora.train`` (``conf/train.yaml``); only its ``eval`` group is
used when a run dir is given (the model, adapter and data come from the run's ``config_resolved.yaml``), so
overrides of the other groups are refused then (:mod:`mtlora.config.command_line`).

Usage::

    python -m mtlora.evaluate run_dir=R eval=bbh                          # outputs into R
    python -m mtlora.evaluate run_dir=R eval=bbh eval/bbh=align_lora eval.bbh.limit=20 out=DIR
    python -m mtlora.evaluate adapter=none model=qwen2.5-7b eval=bbh out=DIR   # base-model baseline
    python -m mtlora.evaluate experiment=hydralora/t3/base out=DIR            # a paper table's Base row

Suites: those of the registry :mod:`mtlora.eval.suites` (:data:`SUITES`), run by its
:func:`~mtlora.eval.suites.run_suites`: ``heldin`` (teacher-forced held-out rows of the run's training tasks, or of
``data=`` for the base model; writes ``metrics/eval_heldin.json`` / ``.md``), ``bbh`` (:mod:`mtlora.eval.bbh_suite`),
``heldin_gen`` and ``mmlu`` (:mod:`mtlora.eval.heldin_gen`, :mod:`mtlora.eval.mmlu`). Options read from the command line besides
Hydra overrides: ``run_dir=``, ``out=`` (required with ``adapter=none``), ``allow_incomplete=true``,
``device=cpu|cuda``, ``adapter=none``, ``trust_remote_code=true`` (needed to load a run whose config enables
remote code: :func:`mtlora.trained_run.guard_remote_code`). Hydra writes nothing (no ``.hydra/``, no log file, no run dir);
only the eval outputs are written. A base-model evaluation (``adapter=none``, or a config whose
``adapter.method`` is ``none``, as the ``conf/experiment/<paper>/<table>/base.yaml`` presets) also makes
``out`` a run dir: ``RUNNING`` then ``COMPLETED``/``FAILED``, ``config_resolved.yaml`` (``adapter: {name:
none, method: none}``, the preset's ``report`` key) and ``meta.json``, so scripts/make_tables.py reads it.

Earlier results are kept: when ``out`` (or the run dir) already holds outputs of a suite about to run
(``metrics/eval_<suite>.*``, ``predictions/<suite>/``, e.g. the end-of-training evaluation), they are moved to
``earlier_evals/<time they were written>/`` first (:func:`mtlora.eval.outputs.keep_earlier_results`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mtlora.cli.entry import NO_OUTPUT_OVERRIDES as READ_ONLY_OVERRIDES
from mtlora.cli.entry import run_model, user_errors, with_default_overrides
from mtlora.cli.help import exit_with_help
from mtlora.errors import ConfigError
from mtlora.eval.suites import SuiteContext, check_suites, output_names, run_suites, suite_names
from mtlora.run.rundir import check_output_dir
from mtlora.utils.logging import console_logging
from mtlora.utils.paths import CONFIG_PATH
from mtlora.utils.resolvers import register_resolvers

register_resolvers()
log = logging.getLogger("mtlora.evaluate")

#: the suites ``eval.suites`` may list (the built-in ones of :mod:`mtlora.eval.suites`)
SUITES = suite_names()
#: evaluating writes no Hydra output; conf/hydra/help/evaluate.yaml is this command's help
NO_OUTPUT_OVERRIDES = {**READ_ONLY_OVERRIDES, "hydra/help": "evaluate"}
#: our own options, taken off the command line before Hydra sees it
OWN_KEYS = ("run_dir", "out", "allow_incomplete", "device", "trust_remote_code")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _start_base_run(cfg: DictConfig, out: Path) -> None:
    """Make ``out`` the run dir of a base-model evaluation: ``RUNNING``, ``config_resolved.yaml`` (adapter
    ``none``) and ``meta.json``, as a training run's (mtlora.train.start_run)."""
    from mtlora.run.manifest import write_meta
    from mtlora.run.rundir import RESOLVED_CONFIG, claim, save_resolved_config

    check_output_dir(out, own=out)
    earlier = out / RESOLVED_CONFIG
    if earlier.is_file():  # never replace a trained run's record with a base-model evaluation
        method = OmegaConf.select(OmegaConf.load(earlier), "adapter.method")
        if method != "none":
            raise ConfigError(
                f"out={out} holds a run with adapter.method={method!r}; a base-model evaluation would replace "
                "its config and status: choose another out=DIR (or run_dir= to evaluate that run)"
            )
    claim(out, "auto")  # a rerun into the same dir replaces the earlier evaluation
    record = cfg.copy()
    with open_dict(record):
        record.adapter = {"name": "none", "method": "none"}
        record.paths.output_dir = str(out.resolve())
    save_resolved_config(record, out)
    write_meta(out, record)


def evaluate(cfg: DictConfig, opts: dict) -> dict:
    """Run ``cfg.eval.suites`` for ``opts`` (run_dir / out / adapter_none / allow_incomplete / device). A
    base-model evaluation (``adapter_none`` or ``adapter.method: none``) into ``out`` records it as a run dir."""
    base = not opts.get("run_dir") and (opts.get("adapter_none") or cfg.adapter.get("method") == "none")
    if not base or not opts.get("out"):
        return _evaluate(cfg, {**opts, "adapter_none": bool(base)})
    from mtlora.run.rundir import finish

    out = Path(opts["out"])
    _start_base_run(cfg, out)
    try:
        results = _evaluate(cfg, {**opts, "adapter_none": True})
    except BaseException as e:
        finish(out, ok=False, message=repr(e))
        raise
    finish(out, ok=True)
    return results


def _evaluate(cfg: DictConfig, opts: dict) -> dict:
    """The suites of ``cfg.eval`` on the run of ``opts["run_dir"]`` or the base model (``opts["adapter_none"]``)."""
    import datasets
    import torch

    from mtlora.eval.outputs import keep_earlier_results

    datasets.disable_progress_bars()  # map/filter bars of the data build; the generation bar stays

    suites = check_suites(cfg.eval.suites)  # one-line ConfigError naming eval.suites
    if opts.get("device"):
        from mtlora.utils.dist import require_device

        require_device(opts["device"], key="device")
    device = torch.device(opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = opts.get("run_dir")
    if run_dir:
        from mtlora.run.rundir import load_resolved_config
        from mtlora.trained_run import guard_remote_code, load_run, run_task_names

        run_dir = Path(run_dir)
        check_output_dir(Path(opts.get("out") or run_dir), own=run_dir)  # before the model loads
        trust = bool(opts.get("trust_remote_code"))
        model, tokenizer = load_run(
            run_dir,
            device=device,
            allow_incomplete=bool(opts.get("allow_incomplete")),
            trust_remote_code=trust,
        )
        out = Path(opts.get("out") or run_dir)
        run_cfg = guard_remote_code(load_resolved_config(run_dir), run_dir, trust)
        task_names = run_task_names(run_dir)
    elif opts.get("adapter_none"):
        if not opts.get("out"):
            raise ConfigError("adapter=none (base-model evaluation) needs out=DIR for the outputs")
        from mtlora.models import build_model, build_tokenizer

        check_output_dir(Path(opts["out"]), own=Path(opts["out"]))  # a base-model run dir of its own
        model, tokenizer = build_model(cfg.model).to(device).eval(), build_tokenizer(cfg.model)
        run_cfg, task_names, out = cfg, None, Path(opts["out"])
    else:
        raise ConfigError("give run_dir=<run dir> (a trained run) or adapter=none model=<preset> out=DIR")
    kept = keep_earlier_results(out, output_names(suites, cfg.eval))
    if kept:
        log.info(
            "earlier results kept in %s", sorted({str(Path(*p.relative_to(out).parts[:2])) for p in kept})
        )
    log.info("eval config:\n%s", OmegaConf.to_yaml(cfg.eval))  # after the model loaded: errors stay one line
    context = SuiteContext(cfg.eval, run_cfg, model, tokenizer, out, device=device, task_names=task_names)
    results = run_suites(suites, context)
    print(f"eval outputs written to {out}", flush=True)
    return results


_OPTS: dict = {}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    console_logging()
    run_dir = _OPTS.get("run_dir")
    with user_errors(cfg, model=(lambda: run_model(run_dir)) if run_dir else None):
        from mtlora.config.command_line import check_command_line

        why = "the run's config_resolved.yaml gives it"
        uses, rules = (("eval", "paths"), ("eval.",)) if run_dir else (None, ("eval.", "model.", "data."))
        check_command_line(cfg, "mtlora.evaluate", uses, rules, why=why)
        evaluate(cfg, _OPTS)


def split_argv(argv: list[str]) -> tuple[list[str], dict]:
    """(argv for Hydra with :data:`NO_OUTPUT_OVERRIDES`, our own options)."""
    opts: dict = {}
    rest = [argv[0]]
    for a in argv[1:]:
        key, sep, value = a.partition("=")
        if sep and key in ("allow_incomplete", "trust_remote_code"):
            if value.lower() not in _BOOL:
                raise ConfigError(f"{key}={value!r}: allowed values are true or false")
            opts[key] = _BOOL[value.lower()]
        elif sep and key in OWN_KEYS:
            opts[key] = value
        elif a == "adapter=none":
            opts["adapter_none"] = True
        else:
            rest.append(a)
    return with_default_overrides(rest, NO_OUTPUT_OVERRIDES), opts


if __name__ == "__main__":
    exit_with_help("evaluate", sys.argv[1:])  # the same text as Hydra's, without composing
    try:
        sys.argv, opts = split_argv(sys.argv)
    except ConfigError as e:
        from mtlora.cli.entry import EXIT_USER_ERROR, report

        report(str(e))
        raise SystemExit(EXIT_USER_ERROR) from None
    _OPTS.update(opts)
    main()
