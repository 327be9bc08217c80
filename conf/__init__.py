# Makes conf/ the package `mtlora.conf` of an installed mtlora (pyproject.toml: package-dir), so that Hydra
# finds the configs as `pkg://mtlora.conf` after a plain `pip install .`.
