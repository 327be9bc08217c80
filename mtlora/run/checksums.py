"""SHA-256 checksums of saved files, recorded next to them and verified before they are loaded.

Every directory of saved weights (``adapter/``, ``checkpoints/step_N/``) gets a ``checksums.json``
(``{"sha256": {relative path: hex digest}}``), written after its files (atomically). :func:`verify` checks
each listed file and raises :class:`~mtlora.errors.IntegrityError` naming the first one that is missing or
differs; directories written before checksums were recorded (no ``checksums.json``) are checked for what
can be parsed only (:func:`check_parseable`), with a warning that says so."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mtlora.errors import IntegrityError
from mtlora.utils.io import atomic_write_text

MANIFEST = "checksums.json"
log = logging.getLogger(__name__)


def read_json(path: Path) -> Any:
    """The content of a JSON file the runner saved (``meta.json``, ``source.json``, ...); raises
    :class:`IntegrityError` naming the file when it cannot be read or parsed (truncated, torn, edited)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise IntegrityError(f"{path} is damaged (cannot be parsed as JSON: {e})") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Record the SHA-256 of every file under ``directory`` (but the manifest) in ``directory/checksums.json``."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    return atomic_write_text(directory / MANIFEST, json.dumps({"sha256": sums}, indent=1) + "\n")


def check_parseable(directory: Path) -> None:
    """Raise :class:`IntegrityError` naming the first ``*.json`` or ``*.safetensors`` file of ``directory``
    (recursively) that cannot be parsed (its header, for safetensors)."""
    from safetensors import safe_open

    for p in sorted(Path(directory).rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                with safe_open(str(p), framework="pt") as f:
                    f.keys()
        except Exception as e:  # json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError
            raise IntegrityError(f"{p} is damaged (cannot be parsed: {e})") from e


def verify(directory: Path) -> None:
    """Check every file recorded in ``directory/checksums.json`` (and parse what can be parsed); raises
    :class:`IntegrityError` naming the damaged file."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        log.warning(
            "%s has no %s (saved before checksums were recorded): its files are checked for parsing only, "
            "so damaged weight bytes would go unnoticed",
            directory,
            MANIFEST,
        )
    else:
        try:
            sums = json.loads(manifest.read_text())["sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{manifest} is damaged (cannot be parsed: {e})") from e
        for rel, expected in sums.items():
            path = directory / rel
            if not path.is_file():
                raise IntegrityError(f"{path} is missing (recorded in {manifest})")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(
                    f"{path} is damaged: its SHA-256 {actual[:16]}... differs from {expected[:16]}... recorded "
                    f"in {manifest} when it was written"
                )
    check_parseable(directory)
