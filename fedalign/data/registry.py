"""The datasets fedalign knows, behind one loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import digits, fashion_mnist, text
from .errors import DataError


@dataclass(frozen=True)
class Arrays:
    """One split of a dataset, with what models and partitioners need to know about it."""

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])


def _fashion_mnist(split: str, data_dir: str | Path | None) -> Arrays:
    X, y = fashion_mnist.load(split, data_dir)
    return Arrays(X, y, num_classes=10)


def _digits(split: str, data_dir: str | Path | None) -> Arrays:
    X, y = digits.load(split)
    return Arrays(X, y, num_classes=10)


def _fortunes(split: str, data_dir: str | Path | None, seq_len: int = 80, stride: int = 16) -> Arrays:
    # The configurable data_dir points at images; the corpus has its own location.
    X, y, groups, names = text.load(split, None, seq_len, stride)
    return Arrays(X, y, num_classes=text.VOCAB_SIZE, groups=groups, group_names=names)


DATASETS: dict[str, Callable[..., Arrays]] = {
    "fashion-mnist": _fashion_mnist,
    "digits": _digits,
    "fortunes": _fortunes,
}


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def dataset_arrays(name: str, split: str = "train", data_dir: str | Path | None = None, **options) -> Arrays:
    """Load one split of dataset ``name`` (``split`` is ``"train"`` or ``"test"``)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return DATASETS[name](split, data_dir, **options)


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of one split: float32 images (n, C, H, W) in [0, 1] or int64 token ids, int64 labels."""
    arrays = dataset_arrays(name, split, data_dir)
    return arrays.X, arrays.y
