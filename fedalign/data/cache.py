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
    error (and deleted if it raises): a partly written file is never seen under its name, also by
    a run reading it at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
        try:
            yield f
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
