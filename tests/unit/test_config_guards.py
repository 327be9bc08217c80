"""Values that used to pass validation and train something other than what was asked: non-finite numbers,
non-boolean booleans, unknown keys, target modules that match nothing, a missing device, ..."""

from __future__ import annotations

import pytest

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from tests.helpers.compose import compose_train


@pytest.mark.parametrize(
    "override",
    [
        "adapter.alpha=nan",
        "adapter.dropout=nan",
        "train.optimizer.lr=nan",
        "train.optimizer.lr=inf",
        "train.warmup_ratio=nan",
        "alignment.weight=inf",
        "train.loss_watchdog.factor=inf",
        "data.sampling.temperature=nan",
        "adapter.alpha=-inf",
    ],
)
def test_non_finite_numbers_are_refused_for_every_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=-?(nan|inf): must be a finite number"):
        validate_config(compose_train([override]))


def test_non_finite_or_negative_sampling_weights_are_refused() -> None:
    base = ["data.sampling.strategy=weights"]
    tasks = list(compose_train([]).data.tasks)
    weights = {t: 1.0 for t in tasks}
    for bad, msg in ((float("nan"), "must be a finite number"), (-1.0, "must be a number >= 0")):
        w = {**weights, tasks[0]: bad}
        over = [*base, "+data.sampling.weights={" + ",".join(f"{k}:{v}" for k, v in w.items()) + "}"]
        with pytest.raises(ConfigError, match=rf"data.sampling.weights.{tasks[0]}=.*{msg}"):
            validate_config(compose_train(over))
    zero = [*base, "+data.sampling.weights={" + ",".join(f"{k}:0" for k in tasks) + "}"]
    with pytest.raises(ConfigError, match="data.sampling.weights: must have a positive sum"):
        validate_config(compose_train(zero))
