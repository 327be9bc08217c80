"""A plain (not editable) ``pip install .`` ships the configs inside the package (``mtlora.conf``), and its
``mtlora`` command runs a smoke job from any directory, with no checkout in sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.compose import REPO

SHIPPED = ("pyproject.toml", "setup.py", "README.md", "mtlora", "conf")


def test_plain_install_runs_a_smoke_job_from_another_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    (src / "conf" / "local" / "default.yaml").write_text("# @package _global_\nseed: 7\n")  # a machine's own
    elsewhere = tmp_path / "elsewhere"  # no checkout here: `python -c` would import one from its cwd
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MTLORA_OUTPUT_DIR")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    venv = tmp_path / "venv"
    # the heavy dependencies come from this interpreter's site-packages; pip and setuptools too
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)]
    r = subprocess.run(pip, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import mtlora; print(mtlora.__file__)"], cwd=elsewhere, env=env, text=True
        ).strip()
    )
    assert site.parent.parent.name == "site-packages" and venv in site.parents
    conf = site.parent / "conf"
    assert (conf / "train.yaml").is_file() and (
        conf / "experiment" / "align_lora" / "t4" / "a_lora_k.yaml"
    ).is_file()
    assert not (conf / "local" / "default.yaml").exists()  # machine-specific overrides are not shipped

    job = [
        "debug=smoke",
        "train.max_steps=2",
        "eval.max_examples_per_task=2",
        "data.budget=64",
        "logger=none",
    ]
    r = subprocess.run(
        [str(venv / "bin" / "mtlora"), "train", *job],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    runs = list((elsewhere / "outputs" / "train" / "runs").glob("*/*/COMPLETED"))  # outputs/ where it ran
    assert len(runs) == 1, out[-3000:]
    hydra_cfg = (runs[0].parent / ".hydra" / "hydra.yaml").read_text()
    assert "path: mtlora.conf" in hydra_cfg and "schema: pkg" in hydra_cfg  # the installed configs
    assert "Setting accelerator to CPU" not in out  # DeepSpeed stays unimported in a plain run
