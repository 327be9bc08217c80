"""The package version (``pyproject.toml``'s ``version``), importable without the root package."""

__version__ = "0.1.0"
