"""The errors fedalign reports to a user as one line and a non-zero exit (Flower-free, so every
layer can raise them). ``DataError`` lives with the data (``fedalign.data.errors``) and
``CheckpointError`` with checkpoints; the CLI catches all of them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or has an impossible value."""


class RoundFailedError(RuntimeError):
    """A round could not gather enough valid replies, even after its retries."""
