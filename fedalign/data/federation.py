"""A federation: one dataset split among clients, each with a local validation split.

``federation(...)`` is cached per process and keyed by everything that determines the split, so a
Ray worker that serves many clients loads and partitions the dataset once, not once per message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError
from .partition import label_histogram, partition, split_train_val
from .registry import Arrays, dataset_arrays


@dataclass(frozen=True)
class ClientData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray


class Federation:
    """Per-client views into one training split, plus the shared test split."""

    def __init__(self, dataset: str, train: Arrays, test: Arrays, parts: list[np.ndarray],
                 val_fraction: float, seed: int, scheme: str, options: dict[str, Any]) -> None:
        self.dataset = dataset
        self._train = train
        self._test = test
        self.scheme = scheme
        self.options = options
        self.seed = seed
        self.splits = [
            split_train_val(p, val_fraction, seed + 1 + i) for i, p in enumerate(parts)
        ]

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
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self._test.X, self._test.y

    def client(self, i: int) -> ClientData:
        if not 0 <= i < self.num_clients:
            raise DataError(f"client {i} does not exist (the federation has {self.num_clients})")
        tr, va = self.splits[i]
        X, y = self._train.X, self._train.y
        return ClientData(X[tr], y[tr], X[va], y[va])

    def histogram(self) -> np.ndarray:
        parts = [np.concatenate(s) for s in self.splits]
        return label_histogram(self._train.y, parts, self.num_classes)

    def summary(self) -> dict[str, Any]:
        hist = self.histogram()
        return {
            "dataset": self.dataset,
            "scheme": self.scheme,
            "options": self.options,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "train_sizes": [len(tr) for tr, _ in self.splits],
            "val_sizes": [len(va) for _, va in self.splits],
            "test_size": int(len(self._test.y)),
            "label_histogram": hist.tolist(),
        }


@functools.lru_cache(maxsize=8)
def _federation(dataset: str, num_clients: int, scheme: str, seed: int, val_fraction: float,
                data_dir: str | None, options: tuple[tuple[str, Any], ...]) -> Federation:
    train = dataset_arrays(dataset, "train", data_dir)
    test = dataset_arrays(dataset, "test", data_dir)
    opts = dict(options)
    extra = {"groups": train.groups} if scheme == "natural" else {}
    parts = partition(train.y, num_clients, scheme, seed, **opts, **extra)
    return Federation(dataset, train, test, parts, val_fraction, seed, scheme, opts)


def federation(dataset: str, num_clients: int, scheme: str, seed: int = 0, val_fraction: float = 0.1,
               data_dir: str | None = None, **options: Any) -> Federation:
    """The (cached) federation for these settings; options go to ``partition``."""
    return _federation(dataset, int(num_clients), scheme, int(seed), float(val_fraction),
                       None if data_dir is None else str(data_dir), tuple(sorted(options.items())))
