"""Compose the train config outside ``python -m mtlora.train`` (benchmarks and scripts that run the training
code in-process): the same ``conf/train.yaml``, overrides and resolvers, resolved as the entry point does."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mtlora.utils.paths import CONF_DIR
from mtlora.utils.resolvers import register_resolvers


def compose_train_config(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` and every interpolation resolved; ``paths.output_dir``
    (Hydra's run dir) is ``run_dir`` when given. The ``hydra`` node is dropped, as in the saved
    ``config_resolved.yaml``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=True)
    if run_dir is not None:
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` resolves against this instance
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg
