"""One writing launch per run dir: a second launch is refused before it changes anything there (not even
Hydra's ``.hydra/`` record), SIGTERM stops every process of a multi-process run before ``FAILED`` is
written, and a run dir stays claimed for as long as any of its writers lives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.compose import REPO, run_cli

FAST = ["train.log_every=1", "logger=none", "eval=none", "train.max_steps=100000", "data.budget=null"]


def _start(d: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtlora.train", f"hydra.run.dir={d}", *FAST, *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _records(d: Path) -> int:
    path = d / "metrics" / "train.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_records(d: Path, p: subprocess.Popen, n: int = 2, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _records(d) < n and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert p.poll() is None and _records(d) >= n, "the run ended or did not start"


def _workers(d: Path) -> list[int]:
    """pids of the ``mtlora.launcher.worker`` processes training into ``d`` (not their ``accelerate launch``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"mtlora.launcher.worker" in cmd
            and str(d).encode() in cmd
            and b"accelerate.commands.launch" not in cmd
        ):
            pids.append(int(proc.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _kill_all(p: subprocess.Popen, pids: list[int]) -> None:
    for pid in [p.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait(timeout=60)


def test_a_second_launch_is_refused_before_it_touches_the_run_dir(tmp_path: Path) -> None:
    d = tmp_path / "run"
    p = _start(d, "adapter.rank=8")
    try:
        _wait_for_records(d, p)
        record = {f: (d / ".hydra" / f).read_bytes() for f in ("config.yaml", "overrides.yaml", "hydra.yaml")}
        resolved = (d / "config_resolved.yaml").read_bytes()
        for extra in ([], ["resume=auto"]):
            r = run_cli([f"hydra.run.dir={d}", *FAST, "adapter.rank=4", *extra], timeout=300)
            assert r.returncode != 0
            assert {f: (d / ".hydra" / f).read_bytes() for f in record} == record  # still rank 8
            assert (d / "config_resolved.yaml").read_bytes() == resolved
            assert sorted(x.name for x in d.iterdir() if x.name.startswith(".hydra")) == [".hydra"]
            assert "claimed by a live process" in r.stderr, r.stderr[-2000:]
            assert "claimed by a live process" not in (d / "train.log").read_text()  # not in the run's log
        assert p.poll() is None  # the first run trains on
    finally:
        _kill_all(p, [])


def test_sigterm_stops_every_worker_of_a_multi_process_run_before_failed(tmp_path: Path) -> None:
    d = tmp_path / "ddp"
    p = _start(d, "hardware=cpu_ddp2")
    workers: list[int] = []
    try:
        _wait_for_records(d, p)
        workers = _workers(d)
        assert len(workers) == 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) != 0
        assert (d / "FAILED").exists() and not (d / "RUNNING").exists()
        assert not [w for w in workers if _alive(w)]  # gone before the launcher returned
        n = _records(d)
        time.sleep(3)
        assert _records(d) == n and not (d / "adapter").exists()  # nothing written after FAILED
    finally:
        _kill_all(p, workers)


def test_a_run_dir_stays_claimed_while_a_worker_lives(tmp_path: Path) -> None:
    """The launcher dies (kill -9) and its workers train on: a resume is refused until they are gone."""
    d = tmp_path / "ddp"
    p = _start(d, "hardware=cpu_ddp2")
    workers: list[int] = []
    try:
        _wait_for_records(d, p)
        workers = _workers(d)
        assert len(workers) == 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        assert [w for w in workers if _alive(w)]
        r = run_cli([f"hydra.run.dir={d}", *FAST, "hardware=cpu_ddp2", "resume=auto"], timeout=300)
        assert r.returncode != 0 and "still writes into it" in r.stderr, r.stderr[-2000:]
        steps = [json.loads(x)["step"] for x in (d / "metrics" / "train.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))  # one writer: no duplicated or reordered records
    finally:
        _kill_all(p, workers)


def test_a_refused_launch_leaves_the_log_of_the_run_it_found_alone(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "COMPLETED").write_text("done\n")
    (d / "train.log").write_text("the earlier run's log\n")
    r = run_cli([f"hydra.run.dir={d}", *FAST, "train.max_steps=1"], timeout=300)
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr[-2000:]
    assert (d / "train.log").read_text() == "the earlier run's log\n"
    assert sorted(x.name for x in d.iterdir()) == [".lock", "COMPLETED", "train.log"]  # nothing staged left


def test_other_ranks_of_a_direct_launch_write_no_hydra_record_or_log(monkeypatch) -> None:
    """Ranks > 0 cannot know whether their launch owns the run dir (rank 0 claims it), so they write nothing
    through Hydra there; rank 0 stages both until it owns it."""
    from mtlora.utils.resolvers import _staged_log, _staged_subdir

    monkeypatch.setenv("RANK", "1")
    assert _staged_subdir() is None and _staged_log("/x/train.log") == os.devnull
    monkeypatch.setenv("RANK", "0")
    assert _staged_subdir() == f".hydra.pending-{os.getpid()}"
    assert _staged_log("/x/train.log") == f"/x/train.log.pending-{os.getpid()}"
