"""kiln's error types that every layer raises: their own module, so that the schema
(train/config.py), the launcher helpers and the backends can all raise a ``ConfigError``
without importing each other (``train.config`` imports ``train.launcher``, which needs the
error back). ``train.config.ConfigError`` is the same class, re-exported."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted key."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"config error: {key}: {msg}")
        self.key = key
