"""The entry points as a user meets them: a user error is one line naming the key or file, exit status 2,
the traceback only with ``HYDRA_FULL_ERROR=1``; a multirun job with a user error is marked FAILED with that
line and the sweep goes on; a local override file without its ``# @package _global_`` header is refused."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.compose import run_cli, run_module

FAST = ["train.log_every=1", "logger=none", "eval=none"]


def _error_line(r) -> str:
    """The single ``error: ...`` line of a failed command (and no traceback anywhere)."""
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_bad_value_is_one_line_with_exit_status_2(tmp_path: Path) -> None:
    d = tmp_path / "run"
    r = run_cli([f"hydra.run.dir={d}", "adapter.rank=0", "train.optimizer.lr=-1", *FAST], timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [_error_line(r)]  # nothing else on stderr
    line = _error_line(r)
    assert "adapter.rank=0: must be an integer >= 1" in line and "train.optimizer.lr=-1" in line
    assert (d / "train.log").read_text().strip().endswith(line.removeprefix("error: "))  # logged too
    assert not (d / "RUNNING").exists() and not (d / "FAILED").exists()  # refused before the run started

    full = run_cli(
        [f"hydra.run.dir={tmp_path / 'full'}", "adapter.rank=0", *FAST], env={"HYDRA_FULL_ERROR": "1"}
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_hub_model_offline_names_model_hub_id_and_the_ways_out(tmp_path: Path) -> None:
    d = tmp_path / "run"
    r = run_cli(
        [f"hydra.run.dir={d}", "model=qwen2.5-0.5b", "train.max_steps=1", *FAST],
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache")},
        timeout=300,
    )
    assert r.returncode == 2
    line = _error_line(r)
    assert line.startswith("error: model.hub_id=Qwen/Qwen2.5-0.5B ") and "offline" in line
    assert "model.init=random model.tokenizer.kind=bytes" in line and "model.hub_id=DIR" in line
    assert (d / "FAILED").exists()  # the run had started: its run dir says how it ended


def test_run_dir_commands_name_the_missing_run_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    for module, args in [
        ("mtlora.evaluate", [f"run_dir={missing}", "eval=bbh"]),
        ("mtlora.diagnose", [f"run_dir={missing}"]),
    ]:  # mtlora.export's own handler: tests/integration/test_export.py; its wrapper: tests/unit/test_cli.py
        r = run_module(module, args, cwd=tmp_path, timeout=300)
        assert r.returncode == 2, (module, r.stderr[-2000:])
        assert _error_line(r) == f"error: run dir {missing} does not exist (or is not a directory)", module
    r = run_module("mtlora.diagnose", [], cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "run_dir= is required" in _error_line(r)


def test_multirun_job_with_a_user_error_fails_in_one_line_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = run_cli(
        ["-m", "adapter.rank=0,2", "train.max_steps=1", *FAST, f"hydra.sweep.dir={sweep}"]
        + ["hydra.sweep.subdir=${hydra.job.num}"],
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]  # the sweep finished, then reported its failed job
    assert (sweep / "0" / "FAILED").exists() and (sweep / "1" / "COMPLETED").exists()
    assert "Traceback" not in out
    failed = [ln for ln in out.splitlines() if "job failed (the sweep goes on)" in ln]
    assert len(failed) == 1 and "adapter.rank=0: must be an integer >= 1" in failed[0]


def test_local_file_without_the_package_header_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "myconf"
    (conf / "local").mkdir(parents=True)
    (conf / "local" / "mine.yaml").write_text("train:\n  max_steps: 3\n")  # no `# @package _global_`
    r = run_module("mtlora.count", ["--config-dir", str(conf), "local=mine"], cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    line = _error_line(r)
    assert f"{conf / 'local' / 'mine.yaml'} lacks the `# @package _global_` header" in line
    assert "conf/local/example.yaml" in line

    (conf / "local" / "mine.yaml").write_text("# @package _global_\nadapter:\n  rank: 3\n")
    r = run_module("mtlora.count", ["--config-dir", str(conf), "local=mine"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lora (rank 3)" in r.stdout  # with the header the file's values apply
