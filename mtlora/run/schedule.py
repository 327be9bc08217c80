"""Step intervals of the training loop (``train.checkpoint_every``, ``eval.every_steps``): ``N``, ``auto`` or null."""

from __future__ import annotations

from typing import Any

from mtlora.errors import ConfigError

#: ``auto``: every ``AUTO_FRACTION`` of the run's optimizer steps (about ten times per run)
AUTO_FRACTION = 0.1


def valid_every(value: Any) -> bool:
    """null, ``auto`` or an integer >= 1."""
    return (
        value is None
        or value == "auto"
        or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    )


def resolve_every(value: Any, total_steps: int, key: str) -> int | None:
    """The interval in optimizer steps: null -> None (never); ``auto`` -> ``max(1, round(0.1 * total_steps))``;
    an integer >= 1 -> itself. Anything else is a ConfigError naming ``key``."""
    if not valid_every(value):
        raise ConfigError(
            f"{key}={value!r}: must be an integer >= 1, 'auto' (every 10% of the steps) or null"
        )
    if value == "auto":
        return max(1, round(AUTO_FRACTION * int(total_steps)))
    return value


def schedule_line(steps: int, checkpoint_every: int | None, eval_every: int | None, eval_at_end: bool) -> str:
    """The log line that says how long a run is and when it checkpoints and evaluates."""
    when = ([f"every {eval_every} steps"] if eval_every else []) + (["at the end"] if eval_at_end else [])
    ckpt = f"every {checkpoint_every} steps" if checkpoint_every else "none"
    return f"{steps} optimizer steps; checkpoint: {ckpt}; held-out eval: {' and '.join(when) or 'none'}"
