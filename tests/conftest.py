"""Shared fixtures: composed configs (the real conf/ tree) and temporary run dirs."""

from __future__ import annotations

import os

# Tiny tensors gain nothing from intra-op threads, and on a 2-core machine torch's threads oversubscribe
# the cores: one thread here and in every subprocess test (which inherits this environment).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.compose import DATA_DIR, compose_train  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("MTLORA_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _outputs_outside_the_repo(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs that pick their own run dir (multirun, failed launches) write under a temp dir, not outputs/."""
    os.environ.setdefault("MTLORA_OUTPUT_DIR", str(tmp_path_factory.mktemp("outputs")))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture
def smoke_overrides() -> list[str]:
    """Overrides for a seconds-long training run of the tiny model."""
    return ["debug=smoke", "train.max_steps=4", "eval.max_examples_per_task=4", "data.budget=64"]


@pytest.fixture
def cfg_smoke(run_dir: Path, smoke_overrides: list[str]):
    return compose_train(smoke_overrides, run_dir=run_dir)


def requires_data_dir() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (DATA_DIR / "flan").is_dir(), reason=f"shared data not at {DATA_DIR}")
