"""Partitions kept on disk, so that a partition is drawn once per dataset, scheme and seed.

Drawing a partition takes milliseconds, but flwr-datasets' partitioners need Hugging Face
``datasets``, whose import (pandas, pyarrow, aiohttp and its TLS context) costs a driver about
0.6 s of CPU in every run, on the cores where Ray is starting (docs/benchmarks.md, issue 27).
A partition depends only on the labels, the scheme and its options, the client count, the seed
and the code that draws it, so it is stored under a digest of all of them (the versions of
flwr-datasets, datasets and NumPy included) in ``$XDG_CACHE_HOME/fedalign/partitions`` and read
back by later runs of the same split.

A stored file is a NumPy archive, read without pickle and checked before use: one part per
client, each sorted, int64, disjoint and within the labels. One that fails the check (or cannot
be read) is drawn again and rewritten, never trusted; a cache that cannot be written leaves the
run as it would have been. The partitioners' warnings to the user are stored too and repeated on
every use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .cache import cache_root, written_atomically
from .partition import partition

log = logging.getLogger(__name__)

#: Bumped when what is stored, or how a key is made, changes.
FORMAT = 1
#: The packages whose code draws a partition: a new version may draw another one.
DRAWN_BY = ("flwr-datasets", "datasets", "numpy")


def partitions_dir() -> Path:
    return cache_root() / "partitions"


def _array_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str} {array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def partition_key(
    labels: np.ndarray, num_clients: int, scheme: str, seed: int, options: dict[str, Any]
) -> str:
    """The digest a partition is stored under: everything that determines it."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return {"array": _array_digest(value)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    described = {
        "format": FORMAT,
        "versions": {name: _version(name) for name in DRAWN_BY},
        "labels": _array_digest(np.asarray(labels)),
        "num_clients": plain(num_clients),
        "scheme": scheme,
        "seed": plain(seed),
        "options": {k: plain(v) for k, v in sorted(options.items())},
    }
    text = json.dumps(described, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path, num_samples: int, num_clients: int) -> tuple[list[np.ndarray], list[str]]:
    """The stored parts and warnings; raises ``ValueError`` (or what reading raised) when the file
    is not a partition of ``num_samples`` rows among ``num_clients`` clients."""
    with np.load(path, allow_pickle=False) as archive:
        indices, sizes, notes = archive["indices"], archive["sizes"], archive["warnings"]
    if indices.dtype != np.int64 or sizes.dtype != np.int64 or notes.dtype.kind != "U":
        raise ValueError(f"dtypes {indices.dtype}, {sizes.dtype}, {notes.dtype}")
    if indices.ndim != 1 or sizes.shape != (num_clients,) or notes.ndim != 1:
        raise ValueError(f"shapes {indices.shape}, {sizes.shape}, {notes.shape}")
    if (sizes < 0).any() or int(sizes.sum()) != len(indices):
        raise ValueError("part sizes do not add up to the indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
        raise ValueError(f"an index outside 0..{num_samples - 1}")
    ends = np.cumsum(sizes)
    rising = np.diff(indices) > 0
    rising[ends[:-1][(ends[:-1] > 0) & (ends[:-1] < len(indices))] - 1] = True  # part borders
    if not rising.all():
        raise ValueError("a part is not strictly increasing")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("clients share a sample")
    return np.split(indices, ends[:-1]), notes.tolist()


def _write(path: Path, parts: list[np.ndarray], notes: list[str]) -> None:
    """Store atomically (a partly written file is never seen under its name)."""
    with written_atomically(path) as f:
        np.savez(
            f,
            indices=np.concatenate(parts).astype(np.int64, copy=False),
            sizes=np.array([len(p) for p in parts], dtype=np.int64),
            warnings=np.array(notes, dtype=str),
        )


def cached_partition(
    labels: np.ndarray, num_clients: int, scheme: str, seed: int = 0, **options: Any
) -> list[np.ndarray]:
    """``partition(labels, num_clients, scheme, seed, **options)``, read from the cache when a
    run drew it before (the same parts, the same warnings)."""
    labels = np.asarray(labels)
    path = partitions_dir() / f"{partition_key(labels, num_clients, scheme, seed, options)}.npz"
    try:
        parts, notes = _read(path, len(labels), num_clients)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.debug("stored partition %s not used (%s); drawing it again", path, exc)
    else:
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=2)
        return parts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = partition(labels, num_clients, scheme, seed, **options)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    try:
        _write(path, parts, notes)
    except OSError as exc:
        log.debug("partition not stored in %s (%s)", path.parent, exc)
    return parts
