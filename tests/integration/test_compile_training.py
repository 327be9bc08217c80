"""Regional compilation (``train.compile``, mtlora.training.compile): every decoder layer compiled in place,
and training with it logs the same losses as eager training, for a plain, a task-aware and an aligned
adapter (what the adapters read from and hand to ``model.adapter_context`` crosses the compiled region)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from mtlora.config import validate_config
from mtlora.errors import ConfigError
from mtlora.models import build_model
from mtlora.training.compile import compile_decoder_layers, decoder_layers, eager_layers, is_compiled
from tests.helpers.compose import compose_train
from tests.helpers.training import SHORT_RUN, logged, train_tiny

# aot_eager: dynamo graph capture + AOT autograd, no code generation (seconds on the CPU); dropout 0 keeps
# the random streams out of the comparison
RUN = [*SHORT_RUN, "train.max_steps=4", "adapter.dropout=0.0"]
AOT = ["train.compile.enabled=true", "train.compile.backend=aot_eager"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """No compiled frame of an earlier test (another backend, other guards) is reused."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs_compiled() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_every_decoder_layer_is_compiled_in_place(tmp_path: Path) -> None:
    cfg = compose_train([*AOT], run_dir=tmp_path)
    model = build_model(cfg.model)
    n = compile_decoder_layers(model, cfg.train.compile)
    layers = decoder_layers(model)
    assert n == len(layers) == int(cfg.model.arch.num_hidden_layers) > 0
    assert all(is_compiled(m) for m in layers) and not is_compiled(model)
    with eager_layers(model):  # generation runs the layers eagerly, then they are compiled again
        assert not any(is_compiled(m) for m in layers)
    assert all(is_compiled(m) for m in layers)
    assert (
        compile_decoder_layers(build_model(cfg.model), compose_train([], run_dir=tmp_path).train.compile) == 0
    )


@pytest.mark.parametrize(
    "adapter",
    [
        ["adapter=mtl_lora"],  # per-row task ids read inside the compiled layers
        ["adapter=align_kl", "train.micro_batch_size=16", "alignment.pool=masked_mean"],  # LoRA + A captures
    ],
    ids=["mtl_lora", "align_kl"],
)
def test_compiled_training_logs_the_eager_losses(adapter: list[str], tmp_path: Path) -> None:
    eager = train_tiny(tmp_path, "eager", [*adapter, *RUN])
    assert _graphs_compiled() == 0
    compiled = train_tiny(tmp_path, "compiled", [*adapter, *RUN, *AOT])
    assert _graphs_compiled() > 0
    assert logged(compiled) == pytest.approx(logged(eager), rel=1e-5, abs=1e-6)
    if adapter[0] == "adapter=align_kl":
        assert logged(compiled, "align_loss") == pytest.approx(logged(eager, "align_loss"), rel=1e-4)
        assert all(v > 0 for v in logged(compiled, "align_loss"))


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager(tmp_path: Path) -> None:
    """The default backend: generated kernels (C++ on the CPU) give the eager losses up to float rounding
    (about 100 s on 2 CPU cores, most of it compiling: `make test-full`)."""
    eager = train_tiny(tmp_path, "eager", [*RUN, "train.max_steps=3"])
    compiled = train_tiny(tmp_path, "compiled", [*RUN, "train.max_steps=3", "train.compile.enabled=true"])
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] > 0
    assert logged(compiled) == pytest.approx(logged(eager), rel=1e-4)


def test_bad_compile_settings_are_config_errors(tmp_path: Path) -> None:
    for bad, key in (
        ("train.compile.mode=fastest", "train.compile.mode"),
        ("train.compile.dynamic=maybe", "train.compile.dynamic"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate_config(compose_train(["train.compile.enabled=true", bad], run_dir=tmp_path))
    validate_config(
        compose_train(["train.compile.enabled=false", "train.compile.mode=fastest"], run_dir=tmp_path)
    )
    with pytest.raises(ConfigError, match="ZeRO-3"):
        validate_config(
            compose_train(["hardware=gpu1_zero3", "train.compile.enabled=true"], run_dir=tmp_path)
        )
