"""The errors fedalign reports to a user as one line and a non-zero exit (Flower-free, so every
layer can raise them). ``DataError`` lives with the data (``fedalign.data.errors``) and
``CheckpointError`` with checkpoints; the CLI catches all of them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'lr'?)`` when ``word`` is close to one of ``choices`` (a misspelled key
    or name), else an empty string: appended to an error that names ``word``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or has an impossible value."""


class RoundFailedError(RuntimeError):
    """A round could not gather enough valid replies, even after its retries. The runner sets
    ``run_dir`` and whether a checkpoint there can be resumed from (``resumable``)."""

    run_dir = None
    resumable = True


class RunFolderError(ValueError):
    """A file of a run folder that cannot be read: missing, truncated, binary, not the JSON it
    should be, or without the keys it should have."""


class RunInterrupted(Exception):
    """The user asked a run to stop (SIGINT, SIGTERM); raised after an exchange with the clients.
    The runner sets the run folder, whether it can be resumed and the signal."""

    run_dir = None
    resumable = False
    signal = None


class ActorPoolBroken(RuntimeError):
    """A client's Ray worker process died (a crash, an OOM kill): Flower keeps routing messages to
    the dead actor, so the simulation is restarted from the last checkpoint on a fresh pool.
    ``lost``: the record (``fedalign.fl.round_log.RoundLog``) of the round it died in, whose
    failures name the dead worker."""

    def __init__(self, message: str, lost: Any = None) -> None:
        super().__init__(message)
        self.lost = lost
