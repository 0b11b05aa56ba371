"""The flwr-datasets partitioners behind ``fedalign.data.partition``: built from a scheme and its
options, run over a table of labels and row indices.

Kept apart because importing flwr-datasets imports Hugging Face ``datasets``, pyarrow and pandas
(about 0.6 s and 80 MiB per process): ``partition`` imports this module only when it partitions,
so a process that reads a partition made elsewhere never pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import sys
import types
import warnings
from typing import Any

import numpy as np


class _LoadedOnFirstUse(types.ModuleType):
    """A module whose code runs when an attribute it lacks is first read (then it is the module
    itself, and nothing else changes: the same object, its own namespace)."""

    def __getattr__(self, attr: str) -> Any:
        self.__class__ = types.ModuleType
        self.__spec__.loader.exec_module(self)
        return getattr(self, attr)


def defer_flwr_datasets_plots() -> None:
    """Make ``flwr_datasets.visualization`` load on its first use instead of with its package.

    ``flwr_datasets/__init__`` imports its plotting helpers, and with them seaborn, SciPy's
    statistics and matplotlib's pyplot: 1.07 s of the 1.08 s flwr-datasets itself costs to import
    (Hugging Face ``datasets`` aside) and 84 MiB, in the driver of every run, while Ray's workers
    start on the same cores (benchmarks.md, issue 27). Registered first as a module that loads on
    first use, the package is there as before and loads when one of its names is first read;
    fedalign reads none. (The standard library's ``LazyLoader`` loads on any attribute read, and
    the import system reads ``__spec__`` on every ``from flwr_datasets import visualization``.)
    """
    name = "flwr_datasets.visualization"
    if "flwr_datasets" in sys.modules:  # imported already, with its plots
        return
    package = importlib.util.find_spec("flwr_datasets")  # a top-level spec runs no code
    if package is None or package.submodule_search_locations is None:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LoadedOnFirstUse
    sys.modules[name] = module


defer_flwr_datasets_plots()

from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner

from .errors import DataError

CLASS_ASSIGNMENTS = ("first-deterministic", "random", "deterministic")


class LabelTable(Dataset):
    """The ``datasets.Dataset`` of labels and row indices handed to the partitioners, made fast.

    With datasets >= 4, ``ds["label"]`` is a lazy column that the partitioners turn into an array
    row by row (about a second per 60,000 rows), and ``select`` fingerprints its index list by
    pickling it element by element (seconds for lists of numpy integers). Here a column is read
    in one go and a selection is fingerprinted by hashing its bytes; the partitions are the same.
    """

    def __getitem__(self, key):
        if isinstance(key, str):
            return _column(self, key)
        return super().__getitem__(key)

    def select(self, indices, *args, **kwargs):
        if not args and kwargs.get("new_fingerprint") is None:
            digest = hashlib.blake2b(
                str(getattr(self, "_fingerprint", "")).encode(), digest_size=16
            )
            digest.update(np.asarray(indices, dtype=np.int64).tobytes())
            kwargs["new_fingerprint"] = digest.hexdigest()
        return super().select(indices, *args, **kwargs)


def _column(ds: Dataset, key: str) -> np.ndarray:
    """One column as a numpy array, read through Arrow (respects a selection's index mapping)."""
    return np.asarray(Dataset.__getitem__(ds.with_format("arrow"), key).to_numpy())


def _classes_per_client(options: dict[str, Any], num_classes: int) -> int:
    k = options.get("classes_per_client", 2)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_classes:
        raise DataError(
            f"partition option classes_per_client must be an integer in [1, "
            f"{num_classes}] (the number of classes present), got {k!r}"
        )
    return int(k)


def _dirichlet(labels: np.ndarray, num_clients: int, seed: int, options: dict) -> Partitioner:
    alpha = options.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not alpha > 0:
        raise DataError(f"partition option alpha must be a number > 0, got {alpha!r}")
    min_size = options.get("min_partition_size", 10)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise DataError(
            f"partition option min_partition_size must be an integer >= 0, got {min_size!r}"
        )
    if num_clients * min_size > len(labels):
        raise DataError(
            f"partition option min_partition_size={min_size} is impossible: {num_clients} clients "
            f"x {min_size} > {len(labels)} samples; lower min_partition_size or use fewer clients"
        )
    return DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=int(min_size),
        self_balancing=bool(options.get("self_balancing", False)),
        seed=seed,
    )


def partitioner(
    scheme: str, labels: np.ndarray, num_clients: int, seed: int, options: dict[str, Any]
) -> Partitioner:
    num_classes = len(np.unique(labels))
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return _dirichlet(labels, num_clients, seed, options)
    if scheme == "shards":
        k = _classes_per_client(options, num_classes)
        if num_clients * k > len(labels):
            raise DataError(
                f"partition 'shards': {num_clients} clients x classes_per_client={k} "
                f"shards need at least {num_clients * k} samples, got {len(labels)}"
            )
        return ShardPartitioner(
            num_partitions=num_clients, partition_by="label", num_shards_per_partition=k, seed=seed
        )
    if scheme == "pathological":
        k = _classes_per_client(options, num_classes)
        mode = options.get("class_assignment", "first-deterministic")
        if mode not in CLASS_ASSIGNMENTS:
            raise DataError(
                f"partition option class_assignment must be one of "
                f"{', '.join(CLASS_ASSIGNMENTS)}, got {mode!r}"
            )
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode=mode,
            seed=seed,
        )
    return NaturalIdPartitioner(partition_by="group")


def run(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    """Each client's ``index`` column, with the partitioners' chatter kept out of the logs
    (Dirichlet resampling warnings, pyarrow deprecations, NaturalIdPartitioner's progress bar)."""
    quiet = (
        contextlib.redirect_stderr(io.StringIO())
        if isinstance(partitioner, NaturalIdPartitioner)
        else contextlib.nullcontext()
    )
    with warnings.catch_warnings(record=True) as caught, quiet:
        warnings.simplefilter("always")
        parts = [
            np.sort(_column(partitioner.load_partition(i), "index").astype(np.int64))
            for i in range(num_clients)
        ]
    for w in caught:
        if "will NOT be used" in str(w.message):  # PathologicalPartitioner left classes out
            warnings.warn(
                f"partition 'pathological': {str(w.message).split(' will')[0]} are not "
                "assigned to any client: num_clients x classes_per_client does not "
                "reach every class (class_assignment='first-deterministic' covers every "
                "class once num_clients >= number of classes)",
                stacklevel=3,
            )
    return parts
