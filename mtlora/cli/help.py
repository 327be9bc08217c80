"""``--help`` of the Hydra entry points, rendered without composing a config.

Hydra's own ``--help`` composes the whole config and lists the config groups through its config loader,
copying the config repository once per group: with this project's ~240 groups and options that costs
seconds. The text is the same template (``conf/hydra/help/<command>.yaml``): ``${hydra.help.header}`` and
``${hydra.help.footer}`` are resolved by OmegaConf and ``$APP_CONFIG_GROUPS`` is filled from a walk of the
config directory, in Hydra's format (``group: option, option`` per group holding config files, sorted,
``hydra/*`` left out).
"""

from __future__ import annotations

import string
from pathlib import Path

from omegaconf import OmegaConf

from mtlora.utils.paths import CONF_DIR

#: the arguments that ask an entry point for its help (``--hydra-help`` stays Hydra's)
HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    """Whether ``argv`` (without the program name) asks for the command's help."""
    return any(a in HELP_FLAGS for a in argv)


def config_groups(conf: Path) -> str:
    """One ``group: option, ...`` line per config group under ``conf`` that holds config files (nested
    groups as ``a/b``), sorted by group, options sorted; ``hydra`` and its subgroups left out."""
    lines: list[tuple[str, str]] = []
    for d in sorted(p for p in conf.rglob("*") if p.is_dir()):
        group = d.relative_to(conf).as_posix()
        if group == "hydra" or group.startswith("hydra/") or "__pycache__" in group:
            continue
        options = sorted(p.stem for p in d.glob("*.yaml"))
        if options:
            lines.append((group, f"{group}: {', '.join(options)}"))
    return "".join(line + "\n" for _, line in sorted(lines))


def render_help(command: str, conf: Path | None = None) -> str:
    """The ``--help`` text of ``command`` (``train``, ``evaluate``, ``diagnose``, ``count``) from its template."""
    conf = conf or CONF_DIR
    node = OmegaConf.load(conf / "hydra" / "help" / f"{command}.yaml")
    template = OmegaConf.create({"hydra": {"help": node}}).hydra.help.template  # resolves header/footer
    return string.Template(template).safe_substitute(
        APP_CONFIG_GROUPS=config_groups(conf), HYDRA_CONFIG_GROUPS="", FLAGS_HELP="", CONFIG=""
    )


def exit_with_help(command: str, argv: list[str]) -> None:
    """Print ``command``'s help and exit 0 when ``argv`` asks for it; return otherwise."""
    if wants_help(argv):
        print(render_help(command))
        raise SystemExit(0)
