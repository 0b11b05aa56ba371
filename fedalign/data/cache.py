"""fedalign's cache folder: downloads, local dataset copies and stored partitions live under it.

Kept in a module of its own so that finding it imports nothing (``local_copy`` imports pyarrow).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/fedalign`` (``~/.cache/fedalign`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedalign"
