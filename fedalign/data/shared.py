"""One copy of a federation's data for every process of a simulation.

Without it every Ray worker that serves clients loads the dataset and partitions it itself: a
private copy of the training split per worker process (Fashion-MNIST's is 188 MB as float32) and
the load and partition in every worker's start. ``write_copy`` saves a federation's arrays and
its per-client row indices as ``.npy`` files in one folder (the driver does it once per run, in
the run folder: ``shared_copy``); ``open_copy`` maps them copy-on-write (``np.load(mmap_mode="c")``:
writable, as torch expects of the arrays it wraps, and a write stays in the process that made it),
so every worker reads the same page-cache pages and indexes only its clients' rows out of them
(indexing copies just those rows, as it did from a private copy), and the indices are the
writer's, so no worker partitions again.

A copy records the settings it was written for (``federation_key``); a worker whose run has other
settings, or that cannot see the folder (a node on another machine of a Ray cluster), builds the
federation itself, as before. Files are read with ``allow_pickle=False``: no code runs from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Arrays
from .federation import Federation, _plain

log = logging.getLogger("fedalign")

META = "federation.json"
FORMAT = 1

_lock = threading.Lock()
# (folder, its federation.json's inode and mtime) -> (the key it was written for, its federation)
_opened: dict[tuple[str, int, int], tuple[str, Federation]] = {}
_refused: set[str] = set()


def key_text(key: tuple) -> str:
    """A federation key as the text a copy records (JSON; tuples become lists)."""
    return json.dumps(key, default=str)


def _save_arrays(directory: Path, prefix: str, arrays: Arrays) -> dict[str, Any]:
    np.save(directory / f"{prefix}_X.npy", np.ascontiguousarray(arrays.X))
    np.save(directory / f"{prefix}_y.npy", np.ascontiguousarray(arrays.y))
    if arrays.groups is not None:
        np.save(directory / f"{prefix}_groups.npy", np.ascontiguousarray(arrays.groups))
    return {
        "num_classes": arrays.num_classes,
        "group_names": None if arrays.group_names is None else list(arrays.group_names),
    }


def _load_arrays(directory: Path, prefix: str, meta: dict[str, Any]) -> Arrays:
    groups = directory / f"{prefix}_groups.npy"
    names = meta["group_names"]
    return Arrays(
        _load(directory / f"{prefix}_X.npy"),
        _load(directory / f"{prefix}_y.npy"),
        num_classes=int(meta["num_classes"]),
        groups=_load(groups) if groups.is_file() else None,
        group_names=None if names is None else tuple(names),
    )


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="c", allow_pickle=False)


def _save_ragged(directory: Path, name: str, rows: list[np.ndarray]) -> None:
    """Index arrays of different lengths as one concatenation and its offsets."""
    offsets = np.cumsum([0, *(len(r) for r in rows)], dtype=np.int64)
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    np.save(directory / f"{name}_index.npy", flat)
    np.save(directory / f"{name}_offsets.npy", offsets)


def _load_ragged(directory: Path, name: str) -> list[np.ndarray]:
    flat = np.load(directory / f"{name}_index.npy", allow_pickle=False)
    offsets = np.load(directory / f"{name}_offsets.npy", allow_pickle=False)
    return np.split(flat, offsets[1:-1])


def write_copy(fed: Federation, directory: str | Path, key: tuple) -> Path:
    """Save ``fed`` (built for ``key``) into ``directory``, replacing what is there; written
    beside it and renamed into place, so a reader never sees half a copy."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    meta = {
        "format": FORMAT,
        "key": key_text(key),
        "dataset": fed.dataset,
        "scheme": fed.scheme,
        "options": {k: _plain(v) for k, v in fed.options.items()},
        "seed": fed.seed,
        "val_fraction": fed.val_fraction,
        "train": _save_arrays(partial, "train", fed.train),
        "test": _save_arrays(partial, "test", fed.test_arrays),
    }
    _save_ragged(partial, "parts", fed.parts)
    _save_ragged(partial, "train_rows", [tr for tr, _ in fed.splits])
    _save_ragged(partial, "val_rows", [va for _, va in fed.splits])
    (partial / META).write_text(json.dumps(meta))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def _read_copy(directory: Path, meta: dict[str, Any]) -> Federation:
    splits = list(
        zip(_load_ragged(directory, "train_rows"), _load_ragged(directory, "val_rows"), strict=True)
    )
    return Federation(
        meta["dataset"],
        _load_arrays(directory, "train", meta["train"]),
        _load_arrays(directory, "test", meta["test"]),
        _load_ragged(directory, "parts"),
        float(meta["val_fraction"]),
        int(meta["seed"]),
        meta["scheme"],
        dict(meta["options"]),
        splits=splits,
    )


def open_copy(directory: str | Path, key: tuple) -> Federation | None:
    """The federation saved in ``directory``, its arrays memory-mapped (cached per process), or
    None (logged once per folder) when the folder is missing or was written for another key."""
    directory = Path(directory)
    try:
        stat = (directory / META).stat()
    except OSError:
        _refuse(str(directory), "it does not exist here")
        return None
    cache_key = (str(directory), stat.st_ino, stat.st_mtime_ns)
    with _lock:
        opened = _opened.get(cache_key)
        if opened is None:
            meta = json.loads((directory / META).read_text())
            if meta.get("format") != FORMAT:
                _refuse(str(directory), f"format {meta.get('format')!r}, not {FORMAT}")
                return None
            opened = (meta["key"], _read_copy(directory, meta))
            _opened.clear()  # one run's copy at a time: drop the maps of earlier runs
            _opened[cache_key] = opened
    written_for, fed = opened
    if written_for != key_text(key):
        _refuse(str(directory), "it was written for other data settings")
        return None
    return fed


def _refuse(directory: str, why: str) -> None:
    if directory not in _refused:
        _refused.add(directory)
        log.info("shared data copy %s not used (%s): loading the data here", directory, why)


@contextlib.contextmanager
def shared_copy(fed: Federation, directory: str | Path, key: tuple) -> Iterator[Path]:
    """``fed`` written to ``directory`` for the duration of the block, then removed (the block
    holds no reference to ``fed``: the caller may let it go once the copy is written)."""
    path = write_copy(fed, directory, key)
    del fed
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
