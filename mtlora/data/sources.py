"""Read a task's raw rows through ``datasets``: generated, local files, or the Hugging Face Hub.

Every loader returns a list of ``(origin, datasets.Dataset)`` parts, where ``origin`` names the file or
hub id/split so that a bad row can be reported as ``row N of <origin>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlora.data.synthetic import GENERATORS, generate
from mtlora.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCE_TYPES = ("synthetic", "json", "csv", "tsv", "hub")
Part = tuple[str, datasets.Dataset]


def _files(src: DictConfig, where: str, split: str | None = None) -> list[Path]:
    files = src.get("data_files")
    if isinstance(files, DictConfig):
        if split not in files:
            raise ConfigError(f"{where}.source.data_files has no entry for split {split!r}")
        files = files[split]
    if files is None:
        raise ConfigError(f"{where}.source.data_files must name the local file(s)")
    paths = [Path(f) for f in (files if isinstance(files, list | ListConfig) else [files])]
    for p in paths:
        if not p.is_file():
            raise DataError(
                f"{where}: data file {p} does not exist. Point MTLORA_DATA_DIR (paths.data_dir) at the "
                f"shared data folder, or override {where}.source.data_files"
            )
    return paths


def _read_tsv(path: Path, columns: list[str], unescape: bool) -> datasets.Dataset:
    """Strict TSV: no quoting, exactly ``len(columns)`` tab-separated fields on every line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")  # "\r" inside fields stays as it is
    except OSError as e:
        raise DataError(f"could not read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e) from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    data: dict[str, list[str]] = {c: [] for c in columns}
    for i, line in enumerate(lines):
        fields = line.removesuffix("\r").split("\t")
        if len(fields) != len(columns):
            raise DataError(
                f"{path}: line {i + 1} (row {i}) has {len(fields)} tab-separated field(s), expected "
                f"{len(columns)} ({columns})"
            )
        for c, v in zip(columns, fields):
            data[c].append(v.replace("\\n", "\n") if unescape else v)
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    return datasets.Dataset.from_dict(data, features=features)


def _utf8_error(path: Path, data: bytes, e: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return DataError(
        f"{path}: line {line} (column {column}) is not valid UTF-8 (byte {data[e.start]:#04x}); re-encode the "
        "file as UTF-8"
    )


def _read_json(path: Path, on_bad_row: str, skipped: list[int]) -> datasets.Dataset:
    """A JSON Lines file (one object per line), or a JSON array of objects. A line that is not valid UTF-8
    or JSON, or not an object, is an error naming the file and line, or skipped (counted in ``skipped``)
    with ``data.on_bad_row=skip``."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":  # one JSON array
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _utf8_error(path, data, e) from e
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno} (column {e.colno}) is not valid JSON: {e.msg}") from e
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise DataError(f"{path}: array item {bad[0]} is not a JSON object")
    else:
        rows, bad_lines, offset = [], [], 0
        for n, raw in enumerate(data.split(b"\n"), 1):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except UnicodeDecodeError as e:
                if on_bad_row != "skip":
                    where = UnicodeDecodeError(e.encoding, data, start + e.start, start + e.end, e.reason)
                    raise _utf8_error(path, data, where) from e
                bad_lines.append(n)
                continue
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if on_bad_row != "skip":
                    raise DataError(
                        f"{path}: line {n} is not a JSON object ({e}) (set data.on_bad_row=skip to skip such "
                        "lines)"
                    ) from e
                bad_lines.append(n)
                continue
            rows.append(row)
        if bad_lines:
            log.warning(
                "%s: skipped %d unreadable line(s) %s (data.on_bad_row=skip)",
                path,
                len(bad_lines),
                bad_lines[:20],
            )
            skipped.append(len(bad_lines))
    if not rows:
        raise DataError(
            f"{path}: the file holds no rows ({'empty' if not data.strip() else 'no JSON objects'})"
        )
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as e:  # pyarrow: a column with values of incompatible types
        raise DataError(
            f"{path}: the rows do not form a table (a field has values of different types): {e}"
        ) from e


def _load_file(
    kind: str, path: Path, src: DictConfig, on_bad_row: str = "error", skipped: list[int] | None = None
) -> datasets.Dataset:
    if kind == "tsv":
        # no quoting, fixed column names, literal "\n" optionally turned into newlines (Flan CoT files)
        if not src.get("columns"):
            raise ConfigError(f"source.columns must list the column names of the tsv file {path}")
        ds = _read_tsv(path, [str(c) for c in src.columns], bool(src.get("unescape_newlines")))
        if len(ds) == 0:
            raise DataError(f"{path}: the file holds no rows (empty)")
        return ds
    if kind == "json":
        ds = _read_json(path, on_bad_row, [] if skipped is None else skipped)
    else:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(path, data, e) from e
        if not data.strip():
            raise DataError(f"{path}: the file holds no rows (empty)")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors in several types; report the file
            raise DataError(f"could not parse {path} as {kind}: {type(e).__name__}: {e}") from e
        if len(ds) == 0:
            raise DataError(f"{path}: the file holds no rows (a header only)")
    if src.get("unescape_newlines"):
        cols = [c for c in ds.column_names if ds.features[c] == datasets.Value("string")]
        ds = ds.map(
            lambda r: {c: (r[c] or "").replace("\\n", "\n") for c in cols}, desc=f"unescape {path.name}"
        )
    return ds


def load_parts(
    src: DictConfig,
    where: str,
    seed: int,
    split: str = "train",
    on_bad_row: str = "error",
    skipped: list[int] | None = None,
) -> list[Part]:
    """Load the rows of ``split`` for the source described by ``src`` (a task's ``source`` node).

    ``on_bad_row=skip``: lines of local JSON files that cannot be read are skipped, their count appended
    to ``skipped``."""
    kind = src.type
    if kind == "synthetic":
        if src.generator not in GENERATORS:
            raise ConfigError(
                f"{where}.source.generator={src.generator!r}: allowed values are {sorted(GENERATORS)}"
            )
        rows = generate(src.generator, int(src.num_examples), seed=int(src.get("seed", seed)))
        return [(f"synthetic:{src.generator}", datasets.Dataset.from_list(rows))]
    if kind in ("json", "csv", "tsv"):
        return [(str(p), _load_file(kind, p, src, on_bad_row, skipped)) for p in _files(src, where, split)]
    if kind == "hub":
        lk = src.get("load_kwargs")
        kwargs = OmegaConf.to_container(lk, resolve=True) if OmegaConf.is_config(lk) else dict(lk or {})
        try:
            ds = datasets.load_dataset(
                src.path, src.get("name"), split=split, revision=src.get("revision"), **kwargs
            )
        except Exception as e:
            raise DataError(
                f"{where}: could not load hub dataset {src.path!r} (split {split!r}): {e}. Without network "
                f"access, download it first or point {where}.source at local files"
            ) from e
        return [(f"hub:{src.path}[{split}]", ds)]
    raise ConfigError(f"{where}.source.type={kind!r}: allowed values are {list(SOURCE_TYPES)}")
