"""Read the offline wandb runs of a run dir (``<run_dir>/wandb/offline-run-*/run-<id>.wandb``) without wandb's API."""

from __future__ import annotations

import json
from pathlib import Path


def wandb_records(wandb_file: Path) -> list:
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``: LevelDB log format, 32 KiB blocks
    of ``crc32 | length | type`` framed chunks after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = wandb_file.read_bytes(), 32768
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def offline_runs(run_dir: Path) -> dict[str, dict]:
    """``{wandb id: {"job_type", "group", "history": {key: last value}, "rows": [{key: value} per log call]}}``
    of the offline wandb runs in ``run_dir`` (a run continued in several offline dirs: the last one read)."""
    runs = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        info: dict = {"history": {}, "rows": []}
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, job_type=rec.run.job_type, group=rec.run.run_group)
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in rec.history.item
                }
                info["history"].update(row)
                info["rows"].append(row)
        runs[info["id"]] = info
    return runs
