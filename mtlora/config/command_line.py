"""The checks every command that composes ``conf/train.yaml`` (``mtlora.evaluate``, ``mtlora.diagnose``,
``mtlora.count``; ``mtlora.train`` runs them inside :func:`mtlora.config.validate_config`) applies to its
command line before it reads or writes anything:

* keys no chosen preset defines (``+foo=1``, ``+eval.batchsize=4``) and non-boolean values of boolean keys
  (``adapter.use_rslora=flase``): :func:`mtlora.config.reference.reference_errors`;
* NaN and infinite numbers anywhere;
* overrides of groups the command does not read (``evaluate run_dir=R adapter.rank=4``: the run's own
  ``config_resolved.yaml`` gives its adapter), which would be ignored without a word;
* the value rules of :func:`mtlora.config.validate_config` for the keys the command reads (``rules``: key
  prefixes such as ``eval.``).

All violations are reported together in one :class:`~mtlora.errors.ConfigError`.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, open_dict

from mtlora.config.reference import hydra_reference, reference_errors
from mtlora.config.validate import non_finite_numbers, validate_config
from mtlora.errors import ConfigError


def _override_key(override: str) -> str:
    """``+eval/bbh@x=y`` -> ``eval/bbh``; ``adapter.rank=4`` -> ``adapter.rank``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def unused_overrides(
    overrides: list[str], uses: tuple[str, ...], own_keys: tuple[str, ...] = ()
) -> list[str]:
    """The overrides that set a key or choose an option of a group outside ``uses`` (``hydra.*`` and
    ``own_keys`` aside)."""
    out = []
    for o in overrides:
        key = _override_key(o)
        group = re.split(r"[./]", key, maxsplit=1)[0]
        if group == "hydra" or key in own_keys or group in uses:
            continue
        out.append(o)
    return out


def rule_errors(cfg: DictConfig, prefixes: tuple[str, ...]) -> list[str]:
    """The errors of :func:`validate_config` on ``cfg`` about keys under ``prefixes``."""
    try:
        validate_config(cfg)
    except ConfigError as e:
        lines = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith("- ")]
        return [ln for ln in lines if ln.startswith(prefixes)]
    return []


def check_command_line(
    cfg: DictConfig,
    command: str,
    uses: tuple[str, ...] | None = None,
    rules: tuple[str, ...] = (),
    own_keys: tuple[str, ...] = (),
    why: str = "",
) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``, composed by ``command`` (module doc).

    ``uses``: the groups the command reads (None: all); ``rules``: key prefixes whose value rules apply;
    ``own_keys``: the command's own top-level keys (``+run_dir=R``), not part of the train config;
    ``why``: why the other groups are not read (ends the message of an unused override)."""
    from hydra.core.hydra_config import HydraConfig

    own = [k for k in own_keys if k in cfg]
    if own:
        cfg = cfg.copy()
        with open_dict(cfg):
            for k in own:
                del cfg[k]
    errors = non_finite_numbers(cfg) + reference_errors(cfg, hydra_reference())
    if uses is not None and HydraConfig.initialized():
        for o in unused_overrides([str(x) for x in HydraConfig.get().overrides.task], uses, own_keys):
            errors.append(
                f"{o}: {command} does not read {_override_key(o)}{f' ({why})' if why else ''}; drop it "
                f"(this command reads {', '.join(f'{u}.*' for u in uses)})"
            )
    if rules and not errors:
        errors += rule_errors(cfg, rules)
    if errors:
        raise ConfigError(f"invalid command line of {command}:\n  - " + "\n  - ".join(errors))


__all__ = ["check_command_line", "rule_errors", "unused_overrides"]
