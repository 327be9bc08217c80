"""Read a task's raw rows through ``datasets``: generated, local files, or the Hugging Face Hub.

Every loader returns a list of ``(origin, datasets.Dataset)`` parts, where ``origin`` names the file or
hub id/split so that a bad row can be reported as ``row N of <origin>``.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtlora.data.synthetic import GENERATORS, generate
from mtlora.errors import ConfigError, DataError

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
        with open(path, encoding="utf-8", newline="") as f:  # keep "\r" inside fields as it is
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"could not read {path} as UTF-8 tsv: {e}") from e
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


def _load_file(kind: str, path: Path, src: DictConfig) -> datasets.Dataset:
    if kind == "tsv":
        # no quoting, fixed column names, literal "\n" optionally turned into newlines (Flan CoT files)
        if not src.get("columns"):
            raise ConfigError(f"source.columns must list the column names of the tsv file {path}")
        return _read_tsv(path, [str(c) for c in src.columns], bool(src.get("unescape_newlines")))
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several types; report the file
        raise DataError(f"could not parse {path} as {kind}: {e}") from e
    if src.get("unescape_newlines"):
        cols = [c for c in ds.column_names if ds.features[c] == datasets.Value("string")]
        ds = ds.map(
            lambda r: {c: (r[c] or "").replace("\\n", "\n") for c in cols}, desc=f"unescape {path.name}"
        )
    return ds


def load_parts(src: DictConfig, where: str, seed: int, split: str = "train") -> list[Part]:
    """Load the rows of ``split`` for the source described by ``src`` (a task's ``source`` node)."""
    kind = src.type
    if kind == "synthetic":
        if src.generator not in GENERATORS:
            raise ConfigError(
                f"{where}.source.generator={src.generator!r}: allowed values are {sorted(GENERATORS)}"
            )
        rows = generate(src.generator, int(src.num_examples), seed=int(src.get("seed", seed)))
        return [(f"synthetic:{src.generator}", datasets.Dataset.from_list(rows))]
    if kind in ("json", "csv", "tsv"):
        return [(str(p), _load_file(kind, p, src)) for p in _files(src, where, split)]
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
