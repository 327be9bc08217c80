"""A lean install: `make train` installs the runtime dependencies only, `make test` the dev extras; a plain run
does not import DeepSpeed (installed with the dev extras), so it does not log DeepSpeed's accelerator."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.compose import REPO


def _make_n(target: str) -> str:
    r = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_train_installs_the_runtime_dependencies_and_make_test_the_dev_extras() -> None:
    train, test = _make_n("train"), _make_n("test")
    assert 'pip install -e "."' in train and "[dev]" not in train
    assert 'pip install -e ".[dev]"' in test
    assert 'pip install -e ".[lorahub]"' in _make_n("lorahub")


def test_a_plain_run_never_imports_deepspeed() -> None:
    """Accelerate's ``unwrap_model`` imports DeepSpeed whenever it is installed, which then logs "Setting
    accelerator to CPU" in every run; the loop's unwrap imports it only for DeepSpeed runs."""
    code = (
        "import sys, torch\n"
        "from accelerate import Accelerator\n"
        "from mtlora.training.deepspeed import unwrap_model\n"
        "acc = Accelerator(cpu=True)\n"
        "m = torch.nn.Linear(2, 2)\n"
        "assert unwrap_model(acc, acc.prepare(m)) is m\n"
        "assert unwrap_model(acc, torch.nn.DataParallel(m)) is m\n"
        "print('deepspeed' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and "Setting accelerator" not in r.stderr
