"""Package list for setuptools (the rest of the metadata is in pyproject.toml): every ``mtlora`` package,
plus ``mtlora.conf``, which pyproject.toml's ``package-dir`` maps to the conf/ folder."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mtlora", "mtlora.*"]), "mtlora.conf"])
