"""Every option of every config group composes and validates; bad values fail with the key named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.run.tracker import PACKAGES
from mtlora.train import preflight
from tests.helpers.compose import CONF, compose_train

GROUPS = [
    "model",
    "adapter",
    "alignment",
    "data",
    "eval",
    "train",
    "hardware",
    "logger",
    "diagnostics",
    "experiment",
    "hparams_search",
    "debug",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def own_leaves(path: Path) -> dict[str, object]:
    """The values a group option file sets itself, by dotted key (its ``defaults`` list and interpolations
    left out; a list is one value)."""
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif "${" not in str(v):
                out[key] = v

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    walk(raw, "")
    return out


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"{group}={option}"], run_dir=tmp_path)
    missing = (
        group == "logger" and option in PACKAGES and importlib.util.find_spec(PACKAGES[option][0]) is None
    )
    if missing:  # an optional tracker package (tensorboard, mlflow) that is not installed here
        with pytest.raises(
            ConfigError, match=f"logger={option} needs the .* package, which is not installed"
        ):
            validate_config(cfg)
    else:
        validate_config(cfg)
    if group == "model":
        assert cfg.model.name in (option, "qwen2.5-7b")
    elif group not in ("experiment", "hparams_search", "debug"):
        own = own_leaves(CONF / group / f"{option}.yaml")
        assert own, f"conf/{group}/{option}.yaml sets nothing of its own"
        if "name" in own:  # a named option is named after its file
            assert own["name"] == option
        for key, value in own.items():  # the option, not another one, reached cfg.<group>
            got = OmegaConf.select(cfg[group], key)
            assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key


@pytest.mark.parametrize("task", _options("data/task"))
def test_every_task_file_composes_into_a_mixture(task: str, tmp_path: Path) -> None:
    cfg = compose_train([f"+data/task@data.tasks.extra={task}"], run_dir=tmp_path)
    validate_config(cfg)
    assert cfg.data.tasks.extra.source.type in ("synthetic", "json", "csv", "tsv", "hub")
    assert cfg.data.tasks.extra.template


def test_every_group_named_by_the_issue_exists() -> None:
    for g in [*GROUPS, "paths", "hydra", "data/task"]:
        assert (CONF / g).is_dir(), g


def test_qwen25_alias_is_the_7b_preset(tmp_path: Path) -> None:
    alias = compose_train(["model=qwen2.5"], run_dir=tmp_path)
    full = compose_train(["model=qwen2.5-7b"], run_dir=tmp_path)
    assert OmegaConf.to_container(alias.model) == OmegaConf.to_container(full.model)
    assert alias.model.hub_id == "Qwen/Qwen2.5-7B"


def test_default_is_the_embedded_tiny_synthetic_lora(tmp_path: Path) -> None:
    cfg = compose_train([], run_dir=tmp_path)
    assert (cfg.model.name, cfg.model.init, cfg.model.tokenizer.kind) == ("tiny", "random", "bytes")
    assert cfg.adapter.method == "lora" and cfg.data.name == "synthetic"
    assert {t.source.type for t in cfg.data.tasks.values()} == {"synthetic"}
    assert len(cfg.data.tasks) >= 4
    assert cfg.paths.output_dir == str(tmp_path)


def test_model_preset_learning_rate_reaches_the_optimizer(tmp_path: Path) -> None:
    assert compose_train(["model=qwen2.5-7b"], run_dir=tmp_path).train.optimizer.lr == pytest.approx(2e-4)
    assert compose_train(["train.optimizer.lr=1e-5"], run_dir=tmp_path).train.optimizer.lr == pytest.approx(
        1e-5
    )


@pytest.mark.parametrize(
    "override,expected",
    [
        ("adapter.rank=0", "adapter.rank=0: must be an integer >= 1"),
        ("adapter.dropout=1.5", "adapter.dropout=1.5"),
        ("train.optimizer.lr=-0.001", "train.optimizer.lr=-0.001: must be a number > 0"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0"),
        ("train.precision=fp8", "train.precision='fp8': must be one of ['fp32', 'bf16']"),
        ("data.sampling.strategy=random", "data.sampling.strategy='random': must be one of"),
        ("data.select=[arithmetic,nope]", "data.select: unknown task(s) ['nope']"),
        ("data.on_bad_row=ignore", "data.on_bad_row='ignore'"),
        ("model.dtype=float8", "model.dtype='float8'"),
        ("hardware.num_processes=2", "hardware.launcher: must be 'accelerate'"),
        ("logger.name=comet", "logger.name='comet'"),
        ("train.checkpoint_every=0", "train.checkpoint_every=0: must be an integer >= 1, 'auto'"),
        ("eval.every_steps=often", "eval.every_steps='often': must be an integer >= 1, 'auto'"),
        ("eval.suites=[bbh_typo]", "eval.suites"),
        ("resume=/no/such/dir", "resume='/no/such/dir'"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override: str, expected: str, tmp_path: Path) -> None:
    cfg = compose_train([override], run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert expected in str(e.value)


def test_all_violations_are_reported_together(tmp_path: Path) -> None:
    cfg = compose_train(["adapter.rank=0", "train.optimizer.lr=-1"], run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert "adapter.rank=0" in str(e.value) and "train.optimizer.lr=-1" in str(e.value)


def test_target_module_matching_nothing_fails_before_weights_are_built(tmp_path: Path) -> None:
    cfg = compose_train(["adapter.target_modules=[qkv_proj]"], run_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "adapter.target_modules=['qkv_proj']" in msg and "q_proj" in msg and "down_proj" in msg


def test_target_modules_are_checked_on_the_meta_device_for_large_presets(tmp_path: Path) -> None:
    cfg = compose_train(["model=qwen2.5-14b", "adapter.target_modules=[c_attn]"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match="c_attn"):
        preflight(cfg)  # 14B on the meta device: no memory, no download


def test_unknown_task_file_is_a_hydra_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(HydraException, match="nope"):
        compose_train(["+data/task@data.tasks.x=nope"], run_dir=tmp_path)


def test_config_hash_ignores_resume_but_not_real_changes(tmp_path: Path) -> None:
    from mtlora.run.manifest import config_hash

    base = config_hash(compose_train([], run_dir=tmp_path))
    assert config_hash(compose_train(["resume=auto"], run_dir=tmp_path)) == base
    assert config_hash(compose_train(["adapter.rank=4"], run_dir=tmp_path)) != base
