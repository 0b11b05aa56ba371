"""scikit-learn's 8x8 digits: small and always available offline, the tests' default dataset."""

from __future__ import annotations

import functools

import numpy as np

from .errors import DataError

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the train/test split is part of the dataset, not of an experiment


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # imported here: scikit-learn costs every process that imports fedalign.data a second
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return {"train": (X_tr, y_tr), "test": (X_te, y_te)}


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``X`` float32 (n, 1, 8, 8) in [0, 1], ``y`` int64; a fixed stratified 80/20 split
    (1437 train / 360 test)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return _splits()[split]
