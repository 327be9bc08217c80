"""Values that used to pass validation and train something other than what was asked: non-finite numbers,
non-boolean booleans, unknown keys, target modules that match nothing, a missing device, ..."""

from __future__ import annotations

import re

import pytest
import torch

from mtlora.config import validate_config
from mtlora.config.validate import leaves
from mtlora.errors import ConfigError
from mtlora.evaluate import evaluate
from mtlora.procedures.finetune.recipe import run_training
from mtlora.train import preflight, run
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


def _bool_keys(cfg) -> list[str]:
    return [k for k, v in leaves(cfg) if isinstance(v, bool) and "[" not in k]


def test_every_boolean_key_refuses_a_value_that_is_not_a_boolean() -> None:
    keys = _bool_keys(compose_train([]))
    assert {"adapter.use_rslora", "train.save_adapter", "train.gradient_checkpointing"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}='flase': must be true or false"):
            preflight(compose_train([f"{key}=flase"]))
    preflight(compose_train(["adapter.use_rslora=false", "train.save_adapter=true"]))


@pytest.mark.parametrize(
    "override",
    [
        "+train.lr=1e-9",
        "+adapter.rnak=4",
        "+alignment.wieght=0.5",
        "+eval.max_exmaples=3",
        "+lr=1e-9",
        "+data.shufle=false",
        "+data.tasks.arithmetic.eval.fracton=0.5",
        "+data.tasks.arithmetic.source.num_exmaples=9",
    ],
)
def test_keys_no_chosen_preset_defines_are_refused(override: str) -> None:
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: unknown (top-level )?key"):
        preflight(compose_train([override]))


def test_known_keys_come_from_the_chosen_presets() -> None:
    """Keys that only some presets define pass where they are defined; optimizer keyword arguments and keys
    added on purpose with ++ pass too."""
    preflight(compose_train(["adapter=mtlora", "adapter.balance_weight=0.1", "alignment=kl"]))
    preflight(compose_train(["+train.optimizer.amsgrad=true", "++eval.bbh.limit=1"]))
    with pytest.raises(ConfigError, match=r"adapter.blc_alpha: unknown key"):
        preflight(compose_train(["adapter=lora", "+adapter.blc_alpha=0.1"]))
    # data: keys of some task preset, source keywords, per-task weights and the optional packing keys
    weights = "+data.sampling.weights={arithmetic:3,word_sorting:1,boolean_expressions:1,counting:1}"
    preflight(compose_train(["data.sampling.strategy=weights", weights]))
    preflight(compose_train(["+data.tasks.arithmetic.template.optional_fields=[a]", "+data.packing=false"]))
    preflight(compose_train(["data=dolly", "data.source.type=json", "+data.source.data_files=rows.jsonl"]))


def test_a_target_module_entry_that_matches_nothing_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"adapter.target_modules: \['v_prj'\] match no linear module"):
        preflight(compose_train(["adapter.target_modules=[q_proj,v_prj]"]))
    preflight(compose_train(["adapter.target_modules=[q_proj,v_proj]"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_missing_cuda_device_is_an_error_not_a_cpu_run(tmp_path) -> None:
    cfg = compose_train(["hardware.device=cuda", "debug=smoke", "train.max_steps=1", "eval=none"], tmp_path)
    with pytest.raises(ConfigError, match="hardware.device=cuda: no CUDA device is available"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run dir is claimed
    with pytest.raises(ConfigError, match="hardware.device=cuda: no CUDA device"):
        run_training(cfg, tmp_path)  # also when the run starts without the command line's checks
    with pytest.raises(ConfigError, match="device=cuda: no CUDA device"):
        evaluate(compose_train(["eval.suites=[heldin]"]), {"run_dir": str(tmp_path), "device": "cuda"})


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU", ""])
def test_a_device_that_is_not_cpu_or_cuda_is_named(device: str) -> None:
    from mtlora.utils.dist import require_device

    with pytest.raises(ConfigError, match=rf"device='{device}': must be cpu, cuda or cuda:N"):
        require_device(device, key="device")
    require_device("cpu", key="device")


@pytest.mark.parametrize("alignment", ["kl", "mmd"])
def test_an_alignment_loss_with_one_task_is_refused(alignment: str) -> None:
    over = [f"alignment={alignment}", "data.select=[arithmetic]", "train.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=rf"alignment={alignment}: .* has 1 task .*term would be 0"):
        validate_config(compose_train(over))
    validate_config(compose_train([f"alignment={alignment}", "data.select=[arithmetic,counting]"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.optimizer.weight_decay=-1", r"train.optimizer.weight_decay=-1: must be a number >= 0"),
        (
            "train.optimizer.betas=[2,0.999]",
            r"train.optimizer.betas=\[2, 0.999\]: must be two numbers in \[0, 1\)",
        ),
        ("train.optimizer.eps=0", r"train.optimizer.eps=0: must be a number > 0"),
        ("train.scheduler.name=bogus", r"train.scheduler.name='bogus': must be one of \['linear', 'cosine'"),
        ("+train.optimizer.foo=1", r"train.optimizer \(torch.optim.AdamW\): TypeError: .*foo"),
        (
            "+train.scheduler.scheduler_specific_kwargs={bad: 1}",
            r"train.scheduler \(transformers.get_scheduler\)",
        ),
    ],
)
def test_optimizer_and_scheduler_values_fail_before_the_run_dir_is_claimed(
    tmp_path, override, message
) -> None:
    cfg = compose_train(["debug=smoke", "eval=none", override], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
