"""Multiruns: every hparams_search / launcher preset composes; a sweep keeps the experiment's adapter and stops
when what it sweeps does not apply; the make sweep targets end with a summary and plot; a failed job does not
stop the sweep, is marked, listed and rerun; the Optuna preset returns the chosen metric; joblib runs jobs in
parallel; a requeued SLURM job resumes; one GPU per joblib worker."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.report.metric_plots import CURVES
from mtlora.report.sweeps import check_swept_keys
from mtlora.run.callbacks import FAILED_JOBS, failed_jobs
from mtlora.train import _job_failed, _result
from mtlora.utils.resolvers import register_resolvers
from tests.helpers.compose import CONF, REPO, compose_train, run_cli

HPARAMS = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
TINY = ["train.max_steps=2", "eval.max_examples_per_task=4", "logger=none", "hardware.num_threads=1"]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _compose_with_hydra(overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", HPARAMS)
def test_hparams_search_presets_compose_and_every_sweep_point_validates(name: str, tmp_path: Path) -> None:
    if name == "optuna" and not _has("hydra_plugins.hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper not installed (pip install -e '.[sweep]')")
    cfg = _compose_with_hydra([f"hparams_search={name}"])
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    params = cfg.hydra.sweeper.params
    assert params
    for key, spec in params.items():
        assert OmegaConf.select(cfg, key) is not None, f"{name}: swept key {key} is not in the config"
        if name == "optuna":
            continue
        for value in str(spec).split(","):  # basic sweeper: every sweep point is a valid config
            validate_config(compose_train([f"hparams_search={name}", f"{key}={value}"], run_dir=tmp_path))
    if name == "optuna":
        assert "OptunaSweeper" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "maximize"
        assert cfg.optimized_metric and cfg.adapter.name == "align_kl"


def _skip_without_optuna(preset: str) -> None:
    if preset == "optuna" and not _has("hydra_plugins.hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper not installed (pip install -e '.[sweep]')")


# (experiment, sweep): the sweep must keep the experiment's adapter, alignment and report cell
COMBOS = [
    ("rlora/t4/rlora", "head_sweep"),
    ("align_lora/t4/mlora", "head_sweep"),
    ("hydralora/t3/hydralora", "head_sweep"),
    ("align_lora/t4/a_lora_m", "lambda_sweep"),
    ("align_lora/t5/a_lora_k", "lambda_sweep"),
    ("align_lora/t4/a_lora_m", "optuna"),
    ("rlora/t4/rlora", "rank_sweep"),
    ("align_lora/t4/lora_r10", "rank_sweep"),
]


@pytest.mark.parametrize(("experiment", "sweep"), COMBOS)
def test_a_sweep_keeps_the_experiments_adapter(experiment: str, sweep: str) -> None:
    _skip_without_optuna(sweep)
    alone = _compose_with_hydra([f"experiment={experiment}"])
    for overrides in (
        [f"experiment={experiment}", f"hparams_search={sweep}"],
        [f"hparams_search={sweep}", f"experiment={experiment}"],
    ):
        cfg = _compose_with_hydra(overrides)
        assert cfg.hydra.runtime.choices.experiment == experiment
        assert cfg.hydra.runtime.choices.adapter == alone.hydra.runtime.choices.adapter
        assert OmegaConf.to_container(cfg.adapter) == OmegaConf.to_container(alone.adapter)
        assert OmegaConf.to_container(cfg.alignment) == OmegaConf.to_container(alone.alignment)
        assert dict(cfg.report) == dict(alone.report) and cfg.report.cell == experiment.rsplit("/", 1)[1]
        check_swept_keys(cfg)  # what it sweeps acts on this config


@pytest.mark.parametrize(
    ("sweep", "adapter", "alignment"),
    [
        ("head_sweep", "hydralora", "none"),
        ("lambda_sweep", "align_kl", "kl"),
        ("optuna", "align_kl", "kl"),
        ("rank_sweep", "lora", "none"),
    ],
)
def test_a_sweep_alone_has_its_documented_default(sweep: str, adapter: str, alignment: str) -> None:
    _skip_without_optuna(sweep)
    cfg = _compose_with_hydra([f"hparams_search={sweep}"])
    assert (cfg.adapter.name, cfg.alignment.name) == (adapter, alignment)
    assert cfg.report.cell is None and cfg.data.name == "synthetic" and cfg.model.name == "tiny"
    check_swept_keys(cfg)
    assert f"hparams_search={sweep}" in (CONF / "hparams_search" / f"{sweep}.yaml").read_text()  # documented
    picked = _compose_with_hydra([f"hparams_search={sweep}", "adapter=rlora"])  # a chosen adapter wins
    assert picked.adapter.name == "rlora"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["hparams_search=head_sweep", "experiment=align_lora/t4/lora_r10"], "adapter.num_heads"),
        (["hparams_search=head_sweep", "adapter=lora"], "adapter.num_heads"),
        (["hparams_search=lambda_sweep", "experiment=rlora/t4/rlora"], "alignment.weight"),
        (["hparams_search=lambda_sweep", "adapter=hydralora"], "alignment.weight"),
        (["hparams_search=optuna", "experiment=hydralora/t3/hydralora"], "alignment.weight"),
    ],
)
def test_a_sweep_whose_keys_do_not_apply_names_the_key(overrides: list[str], key: str) -> None:
    _skip_without_optuna(overrides[0].split("=")[1])
    cfg = _compose_with_hydra(overrides)
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        check_swept_keys(cfg)
    assert overrides[0] in str(e.value) and f"adapter={cfg.hydra.runtime.choices.adapter}" in str(e.value)


def test_the_sweep_stops_before_any_job_when_its_key_does_not_apply(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = run_cli(
        ["hparams_search=lambda_sweep", "experiment=rlora/t4/rlora", f"hydra.sweep.dir={sweep}"], timeout=300
    )
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]  # a user error (mtlora.cli.entry)
    assert "error: hparams_search=lambda_sweep sweeps alignment.weight, but alignment=none" in r.stderr
    assert not list(sweep.glob("*/config_resolved.yaml"))  # no job ran


@pytest.mark.parametrize(
    ("target", "preset", "key", "plot"),
    [
        ("sweep-ranks", "rank_sweep", "adapter.rank", "rank"),
        ("sweep-lambda", "lambda_sweep", "alignment.weight", "lambda"),
        ("sweep-heads", "head_sweep", "adapter.num_heads", "heads"),
    ],
)
def test_make_sweep_targets_write_summary_and_plot_from_one_sweep_dir(target, preset, key, plot, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [
            "make",
            "-n",
            "-o",
            ".make/install.stamp",
            target,
            "SMOKE=1",
            f"REPORTS_DIR={tmp_path}/reports",
            "ARGS=experiment=x/y",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MTLORA_OUTPUT_DIR": str(out)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    sweep_dir = cmd.split("dir='", 1)[1].split("'", 1)[0]
    assert sweep_dir.startswith(f"{out}/sweeps/{target.split('-')[1]}_tiny_")  # fixed before the sweep starts
    assert f"-m mtlora.train hparams_search={preset} " in cmd and "hydra.sweep.dir=$dir" in cmd
    assert "experiment=x/y" in cmd and "data=synthetic" in cmd
    assert f'make_tables.py --runs "$dir" --metric heldin_token_acc --group-by {key} --plot {plot}' in cmd
    assert f"--out {tmp_path}/reports/sweep_{target.split('-')[1]}" in cmd
    assert CURVES[plot][0] == key


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_presets_compose(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = {
        "gpu_pack": "hydra_plugins.hydra_joblib_launcher",
        "slurm": "hydra_plugins.hydra_submitit_launcher",
    }
    if name in plugin and not _has(plugin[name]):
        pytest.skip(f"{plugin[name]} not installed (pip install -e '.[sweep]')")
    monkeypatch.setenv("MTLORA_NUM_GPUS", "4")
    monkeypatch.setenv("MTLORA_SLURM_PARTITION", "gpu")
    cfg = _compose_with_hydra([f"hydra/launcher={name}"])
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    target = {"local": "BasicLauncher", "gpu_pack": "JoblibLauncher", "slurm": "SlurmLauncher"}[name]
    assert launcher["_target_"].endswith(target)
    if name == "gpu_pack":
        assert launcher["n_jobs"] == 4
    if name == "slurm":
        assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
        assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"] == {"requeue": True}
        assert launcher["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
    names = [c["_target_"].rsplit(".", 1)[1] for c in cfg.hydra.callbacks.values()]
    assert {"FailedJobsCallback", "PinGpuPerWorker"} <= set(names)


def test_result_reads_the_optimized_metric(tmp_path: Path) -> None:
    m = tmp_path / "metrics"
    m.mkdir()
    heldin = {"tasks": {"a": {"exact_match": 0.5}}, "macro": {"exact_match": 0.25, "token_acc": 0.75}}
    (m / "eval_heldin.json").write_text(json.dumps(heldin))
    (m / "eval_heldin_gen.json").write_text(json.dumps({"macro": {"score": 0.1}}))
    (m / "eval_bbh_mtlora_direct.json").write_text(json.dumps({"macro": {"accuracy": 0.4, "n": 10}}))
    assert _result(tmp_path) == 0.25  # the default: held-out macro exact match
    assert _result(tmp_path, "heldin/token_acc") == 0.75
    assert _result(tmp_path, "heldin/tasks/a/exact_match") == 0.5
    assert _result(tmp_path, "bbh/macro") == 0.4
    assert _result(tmp_path, "heldin_gen/score") == 0.1
    assert _result(tmp_path, "mmlu/macro") is None and _result(tmp_path, "heldin/nope") is None


@pytest.mark.parametrize(("preset", "expected"), [("optuna", -math.inf), ("rank_sweep", math.nan)])
def test_a_failed_multirun_job_is_marked_and_returns_the_failure_value(
    preset, expected, tmp_path: Path
) -> None:
    if preset == "optuna" and not _has("hydra_plugins.hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper not installed")
    HydraConfig.instance().set_config(_compose_with_hydra([f"hparams_search={preset}"]))
    value = _job_failed(tmp_path / "job", RuntimeError("boom"))
    assert value == expected or (math.isnan(expected) and math.isnan(value))
    assert "RuntimeError('boom')" in (tmp_path / "job" / "FAILED").read_text()


def _dolly(path: Path, broken: bool) -> None:
    rows = [
        {"instruction": f"Say hi {i}", "context": "", "response": "hi", "category": cat}
        for cat in ("open_qa", "closed_qa", "brainstorming")
        for i in range(24)
    ]
    if broken:  # a bad row in closed_qa only: that job fails at runtime, after validation
        rows.append({"instruction": "Broken", "context": "", "response": "", "category": "closed_qa"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_failed_job_does_not_stop_the_sweep_and_is_listed_and_rerun(tmp_path: Path) -> None:
    data, sweep = tmp_path / "dolly.jsonl", tmp_path / "sweep"
    _dolly(data, broken=True)
    args = [
        "-m",
        "data=dolly",
        "data.source.type=json",
        f"+data.source.data_files={data}",
        "data.select=[open_qa],[closed_qa],[brainstorming]",
        "train.micro_batch_size=4",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    r = run_cli(args, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]  # the sweep finished, then reported its failure
    assert (sweep / "0" / "COMPLETED").exists() and (sweep / "2" / "COMPLETED").exists()
    assert (sweep / "1" / "FAILED").exists() and not (sweep / "1" / "RUNNING").exists()
    assert "row 72 of" in (sweep / "1" / "FAILED").read_text()
    assert "1 job(s) of the sweep" in r.stdout and str(sweep / "1") in r.stdout
    lines = [x for x in (sweep / FAILED_JOBS).read_text().splitlines() if not x.startswith("#")]
    assert (
        len(lines) == 1
        and "data.select=[closed_qa]" in lines[0]
        and f"hydra.run.dir={sweep / '1'}" in lines[0]
    )
    assert [j for j, _, _ in failed_jobs(sweep)] == [sweep / "1"]

    done_before = {j: (sweep / j / "COMPLETED").stat().st_mtime_ns for j in ("0", "2")}
    _dolly(data, broken=False)  # fix the data, then rerun exactly the failed job, in its own run dir
    rerun = subprocess.run(
        [sys.executable, "-m", "mtlora.run.callbacks", "rerun", str(sweep)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "[1/1]" in rerun.stdout and "resume=auto" in rerun.stdout
    assert (sweep / "1" / "COMPLETED").exists() and not (sweep / "1" / "FAILED").exists()
    assert (sweep / "1" / "metrics" / "eval_heldin.json").exists()
    assert not (sweep / FAILED_JOBS).exists() and failed_jobs(sweep) == []
    assert done_before == {j: (sweep / j / "COMPLETED").stat().st_mtime_ns for j in ("0", "2")}
    assert "closed_qa" in json.loads((sweep / "1" / "metrics" / "eval_heldin.json").read_text())["tasks"]


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_optuna_sweeper"), reason="hydra-optuna-sweeper not installed"
)
def test_optuna_preset_runs_trials_and_maximises_the_chosen_metric(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    r = run_cli(
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=1",
            "optimized_metric=heldin/token_acc",
            *TINY,
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    jobs = sorted(sweep.glob("*/COMPLETED"))
    assert len(jobs) == 2
    values = [_result(j.parent, "heldin/token_acc") for j in jobs]
    assert all(v is not None and v > 0 for v in values)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))
    assert set(best["best_params"]) == {"adapter.rank", "train.optimizer.lr", "alignment.weight"}


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_joblib_launcher"), reason="hydra-joblib-launcher not installed"
)
def test_joblib_launcher_runs_two_jobs_into_one_sweep_dir(tmp_path: Path) -> None:
    r = run_cli(
        ["-m", "hydra/launcher=gpu_pack", "hydra.launcher.n_jobs=2", "adapter.rank=2,4", *TINY, "eval=none"],
        env={"MTLORA_OUTPUT_DIR": str(tmp_path)},
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    done = sorted(tmp_path.glob("train/multiruns/*/*/COMPLETED"))
    assert len(done) == 2
    assert len({c.parent.parent for c in done}) == 1, "jobs landed in different sweep dirs"
    assert (done[0].parent.parent / "multirun.yaml").exists()  # the sweep process's dir


def test_requeued_slurm_job_resumes_without_resume_flag(tmp_path: Path) -> None:
    d = tmp_path / "job"
    args = [f"hydra.run.dir={d}", "train.max_steps=2", "train.checkpoint_every=1", "eval=none", *TINY]
    assert run_cli(args).returncode == 0
    (d / "COMPLETED").unlink()
    (d / "FAILED").write_text("preempted\n")  # as after submitit's requeue signal
    r = run_cli(args, env={"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "requeued SLURM job" in r.stdout + r.stderr and "resumed from" in r.stdout + r.stderr
    assert (d / "COMPLETED").exists() and len(json.loads((d / "meta.json").read_text())["resumes"]) == 1


_CLAIM = """
import os, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from mtlora.run import callbacks as cb
os.environ["MTLORA_GPU_SLOTS_DIR"] = sys.argv[1]
os.environ["MTLORA_SWEEP_CUDA_VISIBLE_DEVICES"] = "3,5"
cfg = OmegaConf.create({"hardware": {"device": "cuda", "num_processes": 1},
    "hydra": {"launcher": {"_target_": "x.JoblibLauncher", "n_jobs": 2}, "job": {"num": 0}}})
cb.PinGpuPerWorker().on_job_start(cfg)
cb.PinGpuPerWorker().on_job_start(cfg)  # a second job in the same worker keeps its GPU
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_each_joblib_worker_gets_its_own_gpu(tmp_path: Path) -> None:
    def start(hold: float) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _CLAIM, str(tmp_path), str(hold)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )

    a = start(6)
    first = a.stdout.readline().strip()
    b = start(0)
    second = b.communicate(timeout=60)[0].strip()
    assert {first, second} == {"3", "5"}  # two live workers: two GPUs of the sweep's CUDA_VISIBLE_DEVICES
    c = start(0)  # worker b exited: its slot (and GPU) is free again
    assert c.communicate(timeout=60)[0].strip() == second
    a.wait(timeout=60)
