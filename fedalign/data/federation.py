"""A federation: one dataset split among clients, each with a local validation split.

``federation(...)`` is cached per process and keyed by everything that determines the split, so a
Ray worker that serves many clients loads and partitions the dataset once, not once per message,
and the ServerApp and every ClientApp derive the same partition from the same settings. The
partition itself is also kept on disk across runs (``partition_cache``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .datasets import Arrays, dataset_arrays
from .errors import DataError
from .partition import label_histogram, split_train_val
from .partition_cache import cached_partition


@dataclass(frozen=True)
class ClientData:
    """One client's local data (copies taken by indexing the shared arrays)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)


class Federation:
    """Per-client views into one training split, plus the shared test split.

    ``splits[i]`` holds client ``i``'s (train, val) row indices into the training split.
    """

    def __init__(
        self,
        dataset: str,
        train: Arrays,
        test: Arrays,
        parts: list[np.ndarray],
        val_fraction: float,
        seed: int,
        scheme: str,
        options: dict[str, Any],
        splits: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.dataset = dataset
        self._train = train
        self._test = test
        self.scheme = scheme
        self.options = options
        self.seed = seed
        self.val_fraction = val_fraction
        self.parts = parts
        # One seed per client, so a client's validation split does not depend on the others
        # (``splits`` given: computed so before, by the process that wrote a shared copy).
        self.splits = (
            splits
            if splits is not None
            else [split_train_val(p, val_fraction, seed + 1 + i) for i, p in enumerate(parts)]
        )

    @property
    def num_clients(self) -> int:
        return len(self.splits)

    @property
    def num_classes(self) -> int:
        return self._train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._train.input_shape

    @property
    def train(self) -> Arrays:
        """The whole training split the clients' indices point into."""
        return self._train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The shared (server-side) test split ``(X, y)``."""
        return self._test.X, self._test.y

    @property
    def test_arrays(self) -> Arrays:
        """The test split with its class count (what a shared copy writes)."""
        return self._test

    def client_names(self) -> list[str]:
        """A name per client: its group for the natural scheme, else ``client-<i>``."""
        names = self._train.group_names
        if self.scheme == "natural" and names is not None and self._train.groups is not None:
            return [names[int(self._train.groups[p[0]])] for p in self.parts]
        return [f"client-{i}" for i in range(self.num_clients)]

    def client(self, i: int) -> ClientData:
        """Client ``i``'s local training and validation arrays."""
        if not 0 <= i < self.num_clients:
            raise DataError(
                f"client {i} does not exist (the federation has {self.num_clients}: "
                f"0..{self.num_clients - 1})"
            )
        tr, va = self.splits[i]
        X, y = self._train.X, self._train.y
        return ClientData(X[tr], y[tr], X[va], y[va])

    def histogram(self) -> np.ndarray:
        """(clients, classes) label counts of each client's train + validation data."""
        return label_histogram(self._train.y, self.parts, self.num_classes)

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description of the split (written to the run's partition.json)."""
        return {
            "dataset": self.dataset,
            "scheme": self.scheme,
            "options": {k: _plain(v) for k, v in self.options.items()},
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "num_clients": self.num_clients,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "client_names": self.client_names(),
            "train_sizes": [len(tr) for tr, _ in self.splits],
            "val_sizes": [len(va) for _, va in self.splits],
            "test_size": len(self._test.y),
            "label_histogram": self.histogram().tolist(),
        }


def _plain(value: Any) -> Any:
    """numpy scalars and tuples as JSON-friendly Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _hashable(value: Any) -> Any:
    """Option values as hashable cache-key parts (lists and arrays as tuples)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, np.generic):
        return value.item()
    return value


@functools.lru_cache(maxsize=8)
def _federation(
    dataset: str,
    num_clients: int,
    scheme: str,
    seed: int,
    val_fraction: float,
    data_dir: str | None,
    options: tuple[tuple[str, Any], ...],
    dataset_options: tuple[tuple[str, Any], ...],
) -> Federation:
    train = dataset_arrays(dataset, "train", data_dir, **dict(dataset_options))
    test = dataset_arrays(dataset, "test", data_dir, **dict(dataset_options))
    opts = dict(options)
    if scheme == "natural":
        if train.groups is None:
            raise DataError(
                f"partition 'natural' needs a dataset with natural groups; {dataset!r} "
                "has none (fortunes: one per category, femnist: per writer, shakespeare: per "
                "speaking role)"
            )
        parts = cached_partition(train.y, num_clients, scheme, seed, groups=train.groups, **opts)
    else:
        parts = cached_partition(train.y, num_clients, scheme, seed, **opts)
    return Federation(dataset, train, test, parts, val_fraction, seed, scheme, opts)


def forget_loaded() -> None:
    """Drop this process's cached federations and the built-in datasets' cached arrays, so that
    memory they alone hold is freed: a driver that wrote the run's shared copy reads its data
    from the copy from then on (``runs.runner``). A dataset registered by a plugin keeps its own
    cache, if it has one."""
    from . import digits, fashion_mnist, hub, text

    _federation.cache_clear()
    for cached in (fashion_mnist._read_split, digits._splits, hub.load, text.load):
        cached.cache_clear()


def federation_key(
    dataset: str,
    num_clients: int,
    scheme: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple:
    """Everything that determines a federation, normalised and hashable: ``federation``'s cache
    key, and what a shared copy (``fedalign.data.shared``) records it was written for."""
    return (
        dataset,
        int(num_clients),
        scheme,
        int(seed),
        float(val_fraction),
        None if data_dir is None else str(data_dir),
        tuple(sorted((k, _hashable(v)) for k, v in options.items())),
        tuple(sorted((k, _hashable(v)) for k, v in (dataset_options or {}).items())),
    )


def federation(
    dataset: str,
    num_clients: int,
    scheme: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Federation:
    """The (per-process cached) federation for these settings.

    ``options`` go to ``partition`` (e.g. ``alpha``); ``dataset_options`` to the loader (e.g.
    fortunes' ``seq_len``). Equal settings return the same object.
    """
    return _federation(
        *federation_key(
            dataset, num_clients, scheme, seed, val_fraction, data_dir, dataset_options, **options
        )
    )
