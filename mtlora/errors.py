"""Exceptions with messages meant for the person who wrote the config or the data file."""


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and what is allowed."""


class DataError(ValueError):
    """A data file or row is malformed. The message names the file (or hub id) and the row."""


class IntegrityError(RuntimeError):
    """A saved file is damaged: its SHA-256 differs from the one recorded when it was written, or it cannot
    be parsed (truncated, torn). The message names the file."""
