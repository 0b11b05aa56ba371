"""fedalign's cache folder: downloads, local dataset copies, decoded datasets and stored
partitions live under it.

Kept in a module of its own so that finding it imports nothing (``local_copy`` imports pyarrow).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fedalign`` (``~/.cache/fedalign`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedalign"


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[IO[bytes]]:
    """A file to write ``path``'s content into, renamed to ``path`` once the block ends without an
    error and the content is on disk (deleted if anything fails): a partly written file is never
    seen under its name, by a run reading it at the same time or after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
