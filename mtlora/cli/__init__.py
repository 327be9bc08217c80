"""``mtlora <command> [arguments]``: the project's entry points behind one command.

``mtlora train debug=smoke`` runs exactly ``python -m mtlora.train debug=smoke`` (the process is replaced,
so Hydra, signals and exit status are those of the module); ``mtlora <command> --help`` shows that
command's own help, ``mtlora --help`` lists the commands. Nothing heavy is imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from mtlora.cli.entry import EXIT_USER_ERROR

#: command -> (module run with ``python -m``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mtlora.train", "train an adapter into a run dir (Hydra overrides; -m for a sweep)"),
    "evaluate": (
        "mtlora.evaluate",
        "evaluation suites (held-in, BBH, MMLU, ...) on a run dir or a base model",
    ),
    "export": ("mtlora.export", "export a run's adapter as a peft LoRA or merged into the base model"),
    "diagnose": ("mtlora.diagnose", "diagnostics (head similarity, gradient conflict, ...) of a run dir"),
    "count": ("mtlora.count", "total / trainable parameters of a model + adapter, on the meta device"),
    "table": ("mtlora.report.run_table", "every cell of a paper table x seeds, then its report"),
    "failed-jobs": ("mtlora.run.callbacks", "list or rerun the failed jobs of a sweep dir"),
}
USAGE = "usage: mtlora <command> [arguments]   (mtlora <command> --help: that command's options)"


def help_text() -> str:
    width = max(len(c) for c in COMMANDS)
    dwidth = max(len(d) for _, d in COMMANDS.values())
    lines = [USAGE, "", "commands:"]
    lines += [f"  {c:<{width}}  {d:<{dwidth}}  python -m {m}" for c, (m, d) in COMMANDS.items()]
    lines += [
        "",
        "Overrides are Hydra's: group=option, key=value, +new.key=value",
        "(e.g. mtlora train model=qwen2.5-0.5b adapter=hydralora).",
        "Errors are one line naming the key or file; HYDRA_FULL_ERROR=1 shows the traceback.",
    ]
    return "\n".join(lines)


def command_argv(command: str, args: Sequence[str]) -> list[str]:
    """The ``python -m <module> args`` argv that ``mtlora <command> args`` runs."""
    module = COMMANDS[command][0]
    return [sys.executable, "-m", module, *args]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help") and len(args) == 1:
        print(help_text())
        return 0
    if args[0] == "help":  # `mtlora help train` = `mtlora train --help`
        args = [args[1], "--help"]
    if args[0] in ("-V", "--version"):
        from mtlora.utils.version import __version__

        print(f"mtlora {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USER_ERROR
    cmd = command_argv(args[0], args[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(cmd[0], cmd)  # no return: the module's process, signals and exit status
    return subprocess.call(cmd)


__all__ = ["COMMANDS", "command_argv", "help_text", "main"]
