"""Does a ``conf/adapter/*.yaml`` restate its method's spec defaults (or mark where it departs from them)?"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mtlora.adapters.spec import MethodSpec, get_path

#: the tag that marks a deliberate departure from the spec default, on the key's line or the comment above
OVERRIDE = "[override]"
_ABSENT = object()


def _marked(lines: list[str], key: str) -> bool:
    """Whether the line that sets the (last part of the) key, or the comment block right above it, holds
    :data:`OVERRIDE`."""
    leaf = key.rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
    for i, line in enumerate(lines):
        if pattern.match(line):
            if OVERRIDE in line:
                return True
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                if OVERRIDE in lines[j]:
                    return True
                j -= 1
    return False


def unmarked_departures(path: Path, spec: MethodSpec) -> list[str]:
    """The optional knobs that ``path`` itself sets (not via ``defaults:``) to a value other than the spec's
    default without :data:`OVERRIDE` (empty: the file agrees with the spec)."""
    text = path.read_text()
    own = yaml.safe_load(text) or {}
    lines = text.splitlines()
    out = []
    for knob in spec.knobs:
        if knob.required:
            continue
        value = get_path(own, knob.name, _ABSENT)
        if value is _ABSENT or value == knob.default:
            continue
        if not _marked(lines, knob.name):
            out.append(f"{path.name}: {knob.name}={value!r} differs from the spec default {knob.default!r}")
    return out
