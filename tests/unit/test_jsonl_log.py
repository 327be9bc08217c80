"""``metrics/*.jsonl``: rewrites are atomic (a full disk keeps the old file), reading names the file and
line of a bad record, and a record torn by a kill is dropped with a warning instead of breaking resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtlora.errors import DataError
from mtlora.run.metrics import JsonlLog


def _fill(run_dir: Path, n: int) -> JsonlLog:
    log = JsonlLog(run_dir, "train")
    for step in range(1, n + 1):
        log.write({"step": step, "loss": 1.0 / step, "task_loss": {"a": 0.5, "b": 0.25}})
    return log


def test_a_full_disk_during_truncate_keeps_the_whole_history(tmp_path: Path) -> None:
    """As ``ulimit -f``: the rewrite of ``truncate_after`` hits the file-size limit half way."""
    log = _fill(tmp_path, 260)
    before = log.path.read_bytes()
    limit = len(before) // 2  # the kept 219 records need more than this
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from mtlora.run.metrics import JsonlLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an OSError, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            JsonlLog(Path({str(tmp_path)!r}), "train").truncate_after(219)
        except OSError as e:
            print("write failed:", e)
            sys.exit(3)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert log.path.read_bytes() == before  # not 219 records ending in half a line
    assert [r["step"] for r in log.read()] == list(range(1, 261))
    assert sorted(p.name for p in log.path.parent.iterdir()) == ["train.jsonl"]  # no temp file left
    log.truncate_after(219)  # with room again, the rewrite goes through
    assert [r["step"] for r in log.read()] == list(range(1, 220))


def test_a_torn_last_record_is_dropped_and_appends_continue(tmp_path: Path, caplog) -> None:
    log = _fill(tmp_path, 5)
    with log.path.open("a") as f:
        f.write('{"step": 6, "loss": 0.1')  # killed mid-write
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5]
    assert f"{log.path}: line 6 is an incomplete record" in caplog.text
    log.write({"step": 6, "loss": 0.2})
    assert log.read()[-1] == {"step": 6, "loss": 0.2}
    assert len(log.path.read_text().splitlines()) == 6


def test_a_bad_record_inside_the_file_names_file_and_line(tmp_path: Path) -> None:
    log = _fill(tmp_path, 4)
    lines = log.path.read_text().splitlines()
    lines[2] = lines[2][:10]
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{log.path}: line 3 is not a JSON record"):
        log.read()
    log.path.write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(DataError, match=rf"{log.path}: line 1 is not a JSON object"):
        log.read()
