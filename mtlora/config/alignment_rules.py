"""Rules of the ``alignment`` group (conf/alignment: the representation-alignment loss of Align-LoRA,
``docs/methods.md`` §4)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from mtlora.config.checker import MISSING, Checker
from mtlora.config.cross_rules import check_alignment_tasks
from mtlora.errors import ConfigError

ALIGNMENTS = ("none", "kl", "mmd")


def check_alignment(c: Checker, cfg: DictConfig) -> None:
    c.choice("alignment.name", ALIGNMENTS)
    c.num("alignment.weight", 0)
    if cfg.alignment.get("name", "none") == "none":
        return
    from mtlora.training.alignment_window import GROUPINGS, WEIGHTINGS, AlignmentTerm

    c.choice("alignment.pool", ("none", "mean", "masked_mean"))
    c.choice("alignment.pair_reduce", ("sum", "mean"))
    c.choice("alignment.layer_reduce", ("mean", "sum"))
    c.choice("alignment.window", ("micro", "step"))
    c.bool_("alignment.gather")
    for key, allowed in (("grouping", GROUPINGS), ("weighting", WEIGHTINGS)):
        if c.has(f"alignment.{key}"):
            c.choice(f"alignment.{key}", allowed)
    if c.has("alignment.backprop"):
        c.bool_("alignment.backprop")
    pad_to = c.get("alignment.pad_to")
    if pad_to not in (MISSING, None):
        max_len = cfg.model.get("max_seq_len")
        c.rule(
            "alignment.pad_to",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= (max_len or 1),
            f"null or a number of positions >= model.max_seq_len ({max_len}), so that every row fits",
        )
    if not c.errors:  # the cross-key rules of the term (window / pool / pad_to / grouping)
        try:
            AlignmentTerm.from_config(cfg.alignment)
        except ConfigError as e:
            c.errors.append(str(e))
    check_alignment_tasks(c, cfg)
    c.rule(
        "alignment.layers",
        lambda v: v in ("all", "attn", "mlp") or (isinstance(v, ListConfig) and len(v) > 0),
        "'all', 'attn', 'mlp' or a non-empty list of layer-name substrings",
    )
