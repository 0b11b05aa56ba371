"""The datasets fedalign knows, behind one loader that also says what models need to know.

``dataset_arrays`` is the framework's entry point (it carries groups, class count and input
shape); ``load_dataset`` is the plain ``(X, y)`` view of it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedalign.core.registry import Registry, keyword_defaults

from . import digits, fashion_mnist, hub, text
from .errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Arrays:
    """One split of a dataset, with what models and partitioners need to know about it.

    ``groups`` (int64 per sample, indexing ``group_names``) is set for datasets with natural
    clients (fortunes: the category) and is what the ``natural`` partition uses.
    """

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W) for images, (seq_len,) for text."""
        return tuple(self.X.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


def _fashion_mnist(split: str, data_dir: str | Path | None) -> Arrays:
    X, y = fashion_mnist.load(split, data_dir)
    return Arrays(X, y, num_classes=fashion_mnist.NUM_CLASSES)


def _digits(split: str, data_dir: str | Path | None) -> Arrays:
    """``data_dir`` is ignored: scikit-learn ships the digits."""
    X, y = digits.load(split)
    return Arrays(X, y, num_classes=digits.NUM_CLASSES)


def _fortunes(
    split: str, data_dir: str | Path | None, seq_len: int = text.SEQ_LEN, stride: int = text.STRIDE
) -> Arrays:
    """``data_dir``, when given, is a directory of fortune files (one per category)."""
    X, y, groups, names = text.load(
        split, None if data_dir is None else str(data_dir), int(seq_len), int(stride)
    )
    return Arrays(X, y, num_classes=text.VOCAB_SIZE, groups=groups, group_names=names)


def _hub(name: str) -> Callable[..., Arrays]:
    """The loader of hub dataset ``name`` (``hub.BUILTIN`` or ``hf:<repo>``, whose options
    ``hub.generic`` takes)."""

    def load(split: str, data_dir: str | Path | None, **options: Any) -> Arrays:
        s = hub.split_arrays(name, split, data_dir, **options)
        return Arrays(s.X, s.y, s.num_classes, groups=s.groups, group_names=s.group_names)

    return load


DATASETS = Registry("dataset")
"""Dataset name -> loader ``(split, data_dir, **options) -> Arrays`` (``split``: train or test).

Besides these names, ``hf:<org>/<name>`` loads any image-classification dataset of the hub."""
DATASETS.register("fashion-mnist", _fashion_mnist, options={})
DATASETS.register("digits", _digits, options={})
DATASETS.register("fortunes", _fortunes, options={})
for _name, _source in hub.BUILTIN.items():
    DATASETS.register(_name, _hub(_name), options={}, source=_source)


def is_dataset(name: str) -> bool:
    """Whether ``name`` is a registered dataset or an ``hf:<org>/<name>`` hub dataset."""
    if isinstance(name, str) and name.startswith(hub.HF_PREFIX):
        try:
            hub.hf_repo(name)
        except DataError:
            return False
        return True
    return name in DATASETS


def _loader(name: str) -> Callable[..., Arrays]:
    if isinstance(name, str) and name.startswith(hub.HF_PREFIX):
        hub.hf_repo(name)  # one clear error for a malformed name
        return _hub(name)
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or hf:<org>/<name>"
        )
    return DATASETS.get(name).obj


def dataset_names() -> tuple[str, ...]:
    """Names accepted by ``load_dataset`` / ``dataset_arrays`` (and the config's data.dataset)."""
    return DATASETS.names()


def dataset_options(name: str) -> tuple[str, ...]:
    """The loader options dataset ``name`` takes (e.g. fortunes: seq_len, stride)."""
    loader = _loader(name)
    if isinstance(name, str) and name.startswith(hub.HF_PREFIX):
        return tuple(keyword_defaults(hub.generic))
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in inspect.signature(loader).parameters.values() if p.kind in named]
    return tuple(p.name for p in params[2:])


def dataset_arrays(
    name: str, split: str = "train", data_dir: str | Path | None = None, **options: Any
) -> Arrays:
    """Load one split of dataset ``name`` (``split`` is ``"train"`` or ``"test"``).

    Loads are cached per process, so repeated calls (one per client in a Ray worker) are cheap.
    """
    loader = _loader(name)
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    unknown = sorted(set(options) - set(dataset_options(name)))
    if unknown:
        takes = ", ".join(dataset_options(name)) or "no options"
        raise DataError(f"dataset {name!r} takes no option {unknown[0]!r} (it takes: {takes})")
    arrays = loader(split, data_dir, **options)
    if not isinstance(arrays, Arrays):
        raise DataError(
            f"dataset {name!r}: its loader returned {type(arrays).__name__}, not data.Arrays"
        )
    return arrays


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of one split: float32 images (n, C, H, W) in [0, 1] or int64 character ids
    (n, seq_len), and int64 labels (n,)."""
    arrays = dataset_arrays(name, split, data_dir)
    return arrays.X, arrays.y
