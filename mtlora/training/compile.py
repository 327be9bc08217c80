"""Regional compilation (``train.compile``): ``torch.compile`` on every decoder layer, not the whole model.

The decoder layers of a transformer share their code, so compiling each layer's ``forward`` in place
(``nn.Module.compile``) costs one layer's graph (parameters are graph inputs, so the other layers reuse it),
while the embedding, the final norm and the loss stay eager. Compiling each decoder layer this way gave about
1.1x tokens/s for peft's LoRA on a random-init Qwen2.5-0.5B on one H100 (reference figures in
``docs/benchmarks.md``). The adapter layers are inside the decoder layers and are compiled with them; what
they read from ``model.adapter_context`` (task ids) becomes a graph input, and what they hand back (alignment
captures, auxiliary losses) is a graph break, so every adapter keeps its eager behaviour (tested against ``enabled: false``). Generation at the end of a run
(BBH, held-in generation) runs the layers eagerly (:func:`eager_layers`).

Config (``conf/train/default.yaml``)::

    compile:
      enabled: false      # true: compile every decoder layer
      backend: inductor   # any torch.compile backend (inductor; aot_eager / eager for debugging)
      mode: null          # null | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
      dynamic: null       # null: recompile with dynamic shapes once a shape changes; true / false force it
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig
from torch import nn

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM: the modules whose class name ends in
    ``DecoderLayer`` (``Qwen2DecoderLayer``, ``LlamaDecoderLayer``, ...), in model order."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_settings(cfg: DictConfig | dict | None) -> dict | None:
    """``train.compile`` checked; None when compilation is off (or the key is absent, as in older runs)."""
    if not cfg or not cfg.get("enabled", False):
        return None
    backend, mode, dynamic = cfg.get("backend", "inductor"), cfg.get("mode"), cfg.get("dynamic")
    if not isinstance(backend, str) or not backend:
        raise ConfigError(f"train.compile.backend={backend!r}: a torch.compile backend name, e.g. inductor")
    if mode not in MODES:
        raise ConfigError(f"train.compile.mode={mode!r}: allowed values are {list(MODES)}")
    if dynamic not in (None, True, False):
        raise ConfigError(f"train.compile.dynamic={dynamic!r}: allowed values are null, true, false")
    return {"backend": backend, "mode": mode, "dynamic": dynamic}


def compile_decoder_layers(model: nn.Module, cfg: DictConfig | dict | None) -> int:
    """Compile every decoder layer of ``model`` in place per ``train.compile``; returns how many were compiled
    (0 when off). A model without ``*DecoderLayer`` modules is a ConfigError."""
    settings = compile_settings(cfg)
    if settings is None:
        return 0
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"train.compile.enabled=true: {type(model).__name__} has no '*DecoderLayer' modules to compile; "
            "set train.compile.enabled=false"
        )
    kwargs = {k: v for k, v in settings.items() if v is not None}
    for layer in layers:
        layer.compile(**kwargs)
    log.info(
        "torch.compile (%s) on %d decoder layers",
        ", ".join(f"{k}={v}" for k, v in kwargs.items()),
        len(layers),
    )
    return len(layers)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place with ``nn.Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def eager_layers(model: nn.Module) -> Iterator[None]:
    """Run the layers compiled by :func:`compile_decoder_layers` eagerly inside the block (restored after).

    Used around generation (end-of-run BBH / held-in suites): a KV cache that grows every step and batches
    that shrink as rows finish would make the training-shaped graphs recompile again and again."""
    saved = [(m, m._compiled_call_impl) for m in model.modules() if is_compiled(m)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl
