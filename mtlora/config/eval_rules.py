"""Rules of the ``eval`` group: the evaluation schedule, the samples, and the settings and data of the BBH
(``eval.bbh``), generative held-in (``eval.heldin_gen``) and MMLU (``eval.mmlu``) suites. The suites' own
modules are imported when their rules run."""

from __future__ import annotations

from omegaconf import ListConfig

from mtlora.config.checker import EVERY, MISSING, Checker, int_ok, one_of
from mtlora.errors import ConfigError
from mtlora.run.schedule import valid_every


def check_eval(c: Checker) -> None:
    """The keys every suite shares (the list ``eval.suites`` is checked by the caller)."""
    c.int_("eval.batch_size", 1)
    c.rule("eval.every_steps", valid_every, EVERY)
    c.int_("eval.max_examples_per_task", 1, optional=True)
    if c.get("eval.samples") not in (MISSING, None):  # mtlora.eval.samples
        c.int_("eval.samples.per_task", 0)
        c.int_("eval.samples.max_new_tokens", 1)


def check_suites(c: Checker) -> None:
    """The settings of the chosen suites that have their own (BBH, generative held-in, MMLU)."""
    suites = c.get("eval.suites") or ()
    if "bbh" in suites:  # BBH suite (mtlora.eval.bbh_suite), data dir checked up front
        check_bbh(c)
    if {"heldin_gen", "mmlu"} & set(suites):  # generation suites, MMLU data checked up front
        check_generation_suites(c, set(suites))


def check_bbh(c: Checker) -> None:
    from mtlora.eval.bbh import PROTOCOLS, TASKS, bbh_dir

    n_errors = len(c.errors)
    c.choice("eval.bbh.protocol", tuple(PROTOCOLS))
    c.rule(
        "eval.bbh.tasks",
        lambda v: v is None or (isinstance(v, ListConfig) and set(v) <= set(TASKS)),
        f"null (all) or a list drawn from the 27 BBH tasks {list(TASKS)}",
    )
    c.int_("eval.bbh.limit", 1, optional=True)
    c.int_("eval.bbh.max_new_tokens", 1, optional=True)
    c.int_("eval.bbh.batch_tokens", 1)
    c.int_("eval.bbh.max_batch_size", 1, optional=True)
    if c.get("eval.bbh.max_input_tokens") is not MISSING:  # absent in configs of older runs
        c.rule(
            "eval.bbh.max_input_tokens",
            lambda v: v == "model" or int_ok(0, True)(v),
            "null, 0 (never cut), an integer >= 1 or 'model' (model_max_length - max_new_tokens)",
        )
    if c.get("eval.bbh.model_max_length") is not MISSING:
        c.int_("eval.bbh.model_max_length", 1, optional=True)
    if c.get("eval.bbh.truncation_side") is not MISSING:
        c.choice("eval.bbh.truncation_side", (None, "left", "right"))
    c.rule(
        "eval.bbh.task_id",
        lambda v: v is None or isinstance(v, str) or int_ok(0)(v),
        "null, a training task id (int >= 0) or a training task name",
    )
    if len(c.errors) == n_errors:  # prompt room of the "model" truncation, when the length is known now
        from mtlora.eval.bbh_suite import check_room

        model = c.get("model")
        try:
            check_room(c.get("eval.bbh"), None if model is MISSING else model)
        except ConfigError as e:
            c.errors.append(str(e))
    data_dir = c.get("eval.bbh.data_dir") or None
    name = c.get("eval.bbh.protocol")
    protocol = PROTOCOLS.get(name) if isinstance(name, str) else None
    if data_dir == "hub" and protocol is not None and protocol.prompt.demos == "task_file":
        return  # examples from the hub, no prompt files needed
    try:
        bbh_dir(data_dir)
    except Exception as e:  # DataError naming the path, MTLORA_DATA_DIR and the hub id
        c.errors.append(f"eval.bbh.data_dir: {e}")


def check_generation_suites(c: Checker, suites) -> None:
    """``eval.heldin_gen`` / ``eval.mmlu`` (mtlora.eval.heldin_gen, mtlora.eval.mmlu) and the tasks' metrics."""
    from mtlora.eval.mmlu import SUBJECTS, mmlu_dir
    from mtlora.eval.scoring import METRICS

    if "heldin_gen" in suites:
        for k in ("max_new_tokens", "batch_tokens"):
            c.int_(f"eval.heldin_gen.{k}", 1)
        for k in ("limit", "max_batch_size"):
            c.int_(f"eval.heldin_gen.{k}", 1, optional=True)
        if c.get("eval.heldin_gen.max_input_tokens") is not MISSING:  # absent in configs of older runs
            c.int_("eval.heldin_gen.max_input_tokens", 1, optional=True)
        if c.get("eval.heldin_gen.truncation_side") is not MISSING:
            c.choice("eval.heldin_gen.truncation_side", ("left", "right"))
        for name in c.cfg.data.get("tasks") or {}:  # optional key, default exact
            if c.get(f"data.tasks.{name}.eval.metric") not in (MISSING, None, *METRICS):
                c.rule(
                    f"data.tasks.{name}.eval.metric", one_of(METRICS), f"one of {list(METRICS)} (or absent)"
                )
    if "mmlu" in suites:
        c.rule(
            "eval.mmlu.subjects",
            lambda v: v is None or (isinstance(v, ListConfig) and set(v) <= set(SUBJECTS)),
            f"null (all) or a list drawn from the 57 MMLU subjects {list(SUBJECTS)}",
        )
        c.int_("eval.mmlu.limit", 1, optional=True)
        c.rule(
            "eval.mmlu.shots",
            lambda v: int_ok(0)(v) and v <= 5,
            "an integer from 0 to 5 (dev rows per subject)",
        )
        for k in ("max_new_tokens", "batch_tokens"):
            c.int_(f"eval.mmlu.{k}", 1)
        c.int_("eval.mmlu.max_batch_size", 1, optional=True)
        c.rule(
            "eval.mmlu.task_id",
            lambda v: isinstance(v, str) or int_ok(0)(v),
            "a task id (int >= 0) or task name",
        )
        # an explicit data dir is checked up front; the default ($MTLORA_DATA_DIR/mmlu, absent offline) when the
        # suite runs (after the adapter is saved), so the optional suite never blocks composing eval=mmlu
        if c.get("eval.mmlu.data_dir") not in (MISSING, None, "hub"):
            try:
                mmlu_dir(c.get("eval.mmlu.data_dir"))
            except Exception as e:  # DataError naming the path, MTLORA_DATA_DIR and the hub id
                c.errors.append(f"eval.mmlu.data_dir: {e}")
