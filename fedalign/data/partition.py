"""Partitioning client data through flwr-datasets' partitioners.

The partitioners read only the label column, so they get a ``datasets.Dataset`` of labels and row
indices, never the images: partitioning 60,000 images then takes milliseconds and returns, per
client, indices into the arrays already in memory.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from .errors import DataError

SCHEMES = ("iid", "dirichlet", "shards", "pathological", "natural")


def partition_schemes() -> tuple[str, ...]:
    return SCHEMES


def _partitioner(scheme: str, num_clients: int, seed: int, labels: np.ndarray, options: dict):
    def option(name: str, default=None):
        return options.pop(name, default)

    if scheme == "iid":  # takes contiguous rows: the rows are shuffled by seed first (below)
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        alpha = option("alpha", 0.5)
        if not alpha > 0:
            raise DataError(f"partition option alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=float(alpha),
            min_partition_size=int(option("min_partition_size", 10)),
            self_balancing=bool(option("self_balancing", False)), seed=seed,
        )
    if scheme == "pathological":
        k = int(option("classes_per_client", 2))
        if not 1 <= k <= len(np.unique(labels)):
            raise DataError(f"partition option classes_per_client must be in [1, number of classes], got {k}")
        return PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label", num_classes_per_partition=k,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    if scheme == "shards":
        k = int(option("classes_per_client", 2))
        if k < 1:
            raise DataError(f"partition option classes_per_client must be >= 1, got {k}")
        # Sort-and-shard as in McMahan et al.: k label-sorted shards per client.
        return ShardPartitioner(
            num_partitions=num_clients, partition_by="label", num_shards_per_partition=k, seed=seed,
        )
    if scheme == "natural":
        return NaturalIdPartitioner(partition_by="group")
    raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _natural_groups(groups: np.ndarray | None, num_clients: int) -> np.ndarray:
    """The ``num_clients`` largest groups, as a mask over samples."""
    if groups is None:
        raise DataError("partition scheme 'natural' needs per-sample groups (datasets with "
                        "natural clients: fortunes)")
    ids, sizes = np.unique(groups, return_counts=True)
    if num_clients > len(ids):
        raise DataError(f"partition 'natural': {num_clients} clients but the data has only "
                        f"{len(ids)} groups")
    keep = ids[np.argsort(-sizes, kind="stable")[:num_clients]]
    return np.isin(groups, keep)


def partition(
    labels: np.ndarray, num_clients: int, scheme: str, seed: int = 0, **options
) -> list[np.ndarray]:
    """Split sample indices among ``num_clients``; deterministic given ``seed``.

    Options: ``alpha`` and ``min_partition_size`` (dirichlet), ``classes_per_client`` (shards,
    pathological), ``groups`` (natural: a group id per sample; the ``num_clients`` largest groups
    become the clients, in order of group id). Returns sorted int64 indices per client.
    """
    labels = np.asarray(labels)
    options = dict(options)
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise DataError(f"num_clients ({num_clients}) is more than the number of samples ({len(labels)})")
    groups = options.pop("groups", None)
    columns = {"label": labels, "index": np.arange(len(labels))}
    if scheme == "natural":
        mask = _natural_groups(None if groups is None else np.asarray(groups), num_clients)
        columns = {"label": labels[mask], "index": np.flatnonzero(mask), "group": np.asarray(groups)[mask]}
    partitioner = _partitioner(scheme, num_clients, seed, labels, options)
    if options:
        raise DataError(f"partition scheme {scheme!r} takes no option {sorted(options)[0]!r}")
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(len(columns["label"]))
        columns = {k: v[order] for k, v in columns.items()}
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        parts = [
            np.sort(np.asarray(partitioner.load_partition(i).with_format("numpy")[:]["index"], dtype=np.int64))
            for i in range(num_clients)
        ]
    except ValueError as exc:
        raise DataError(f"partition {scheme!r} with {num_clients} clients failed: {exc}") from None
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(
                f"partition {scheme!r} left client {i} without data; use fewer clients, a larger "
                "alpha or classes_per_client, or another seed"
            )
    return parts


def split_train_val(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local validation split; at least one sample stays for training."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_val = min(int(round(val_fraction * len(indices))), len(indices) - 1)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def format_histogram(hist: np.ndarray, max_classes: int = 20) -> str:
    """A text table: one row per client, one column per class, and totals."""
    hist = np.asarray(hist)
    shown = hist[:, :max_classes]
    width = max(5, len(str(int(hist.max(initial=0)))) + 1)
    head = "client " + "".join(f"{c:>{width}}" for c in range(shown.shape[1]))
    head += ("  ..." if hist.shape[1] > max_classes else "") + f"{'total':>8}"
    rows = [head]
    for i, row in enumerate(shown):
        rows.append(f"{i:>6} " + "".join(f"{int(v):>{width}}" for v in row)
                    + ("     " if hist.shape[1] > max_classes else "") + f"{int(hist[i].sum()):>8}")
    rows.append("total  " + "".join(f"{int(v):>{width}}" for v in shown.sum(0))
                + ("     " if hist.shape[1] > max_classes else "") + f"{int(hist.sum()):>8}")
    return "\n".join(rows)
