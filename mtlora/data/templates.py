"""Turn a source row into ``(prompt, target)`` text.

Two kinds of template (``task.template``):

* ``{prompt: "...{field}...", target: "...{field}..."}``: Python format strings over the row's fields;
* ``{flan_key: cot_gsm8k, file: <templates.json>}``: the Flan-v2 zero-shot patterns for that key, one
  pattern drawn per row (seeded, so the same row always gets the same pattern).
"""

from __future__ import annotations

import json
import random
import string
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig

from mtlora.errors import ConfigError, DataError


@lru_cache(maxsize=8)
def _flan_patterns(path: str) -> dict[str, list[dict[str, str]]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Flan template file {p} does not exist (set MTLORA_DATA_DIR or paths.data_dir)")
    raw = p.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"Flan template file {p}: line {line} is not valid UTF-8 (damaged file?)") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"Flan template file {p}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); the file "
            "is damaged or truncated: restore it from the data sources"
        ) from e
    patterns = data.get("patterns", data) if isinstance(data, dict) else None
    if not isinstance(patterns, dict):
        raise DataError(f"Flan template file {p}: expected an object of pattern lists by Flan key")
    for key, pats in patterns.items():
        ok = isinstance(pats, list) and all(
            isinstance(x, dict) and isinstance(x.get("input"), str) and isinstance(x.get("target"), str)
            for x in pats
        )
        if not ok:
            raise DataError(
                f"Flan template file {p}: key {key!r} must hold a list of {{input, target}} string patterns"
            )
    return patterns


class Template:
    """A list of (prompt pattern, target pattern) pairs and a rule for choosing one per row."""

    def __init__(
        self, patterns: list[tuple[str, str]], seed: int, where: str, optional_fields: list[str] | None = None
    ) -> None:
        self.patterns = patterns
        self.optional_fields = set(optional_fields or [])
        self.seed = seed
        self.where = where
        self.fields = sorted(
            {f for p in patterns for s in p for _, f, _, _ in string.Formatter().parse(s) if f}
        )

    @property
    def required_fields(self) -> list[str]:
        """Fields every row must carry, non-empty (``optional_fields`` may be missing or empty)."""
        return [f for f in self.fields if f not in self.optional_fields]

    @classmethod
    def from_config(cls, cfg: DictConfig, seed: int, where: str) -> Template:
        if cfg.get("flan_key"):
            patterns = _flan_patterns(str(cfg.file))
            if cfg.flan_key not in patterns:
                raise ConfigError(f"{where}.flan_key={cfg.flan_key!r} is not in {cfg.file}")
            pats = [(p["input"], p["target"]) for p in patterns[cfg.flan_key]]
            if cfg.get("pick") == "first":
                pats = pats[:1]
            return cls(pats, seed, where, cfg.get("optional_fields"))
        if cfg.get("prompt") is None or cfg.get("target") is None:
            raise ConfigError(f"{where}: set either flan_key+file or prompt+target")
        return cls([(str(cfg.prompt), str(cfg.target))], seed, where, cfg.get("optional_fields"))

    def render(self, row: dict, index: int) -> tuple[str, str]:
        """Fill the pattern chosen for row number ``index``."""
        k = (
            0
            if len(self.patterns) == 1
            else random.Random(f"{self.seed}:{index}").randrange(len(self.patterns))
        )
        prompt, target = self.patterns[k]
        values = {f: ("" if row.get(f) is None else row[f]) for f in self.fields}
        return prompt.format(**values), target.format(**values)
