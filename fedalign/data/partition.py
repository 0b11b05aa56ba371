"""Partitioning client data through flwr-datasets' partitioners, plus label histograms.

The partitioners read only the label column, so they get a ``datasets.Dataset`` of labels and row
indices, never the images: partitioning 60,000 images then takes well under two seconds and
returns, per client, indices into the arrays already in memory.

Schemes (``num_clients`` = N):

- ``iid``: rows shuffled by ``seed``, then ``IidPartitioner``'s N equal contiguous blocks.
- ``dirichlet``: ``DirichletPartitioner`` (per class, client shares ~ Dir(alpha); small ``alpha``
  = strong label skew); options ``alpha`` (> 0), ``min_partition_size`` (resampled until every
  client has that many samples, at most 10 tries), ``self_balancing``.
- ``shards``: McMahan et al.'s sort-and-shard through ``ShardPartitioner``: the label-sorted
  rows are cut into N * k equal shards and every client gets k of them at random
  (k = ``classes_per_client``). A client sees at most k classes whenever the shard size
  n // (N * k) divides every class size (e.g. Fashion-MNIST with 100 clients x 2 shards of 300,
  or 10 x 2 of 3,000); otherwise a shard can straddle two classes (at most 2k classes per client).
  The n mod (N * k) rows left over are not used.
- ``pathological``: ``PathologicalPartitioner``: every client gets exactly k classes (at most k
  when a class has fewer samples than clients choosing it) and each class's rows (shuffled by
  ``seed``) are split evenly among the clients that chose it; option ``class_assignment``:
  ``first-deterministic`` (default: client i's first class is i mod C, so every class is used
  once N >= C; the other k - 1 are drawn), ``random`` or ``deterministic`` (classes i..i+k-1).
- ``natural``: one client per group (option ``groups``: a group id per sample), through
  ``NaturalIdPartitioner``; with more groups than clients the N largest groups are used (ties:
  smaller id), in order of group id.

Every scheme is deterministic given ``seed`` and returns disjoint sorted int64 indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError

SCHEMES = ("iid", "dirichlet", "shards", "pathological", "natural")
#: Options each scheme takes (``groups`` is the natural scheme's data, not a tuning knob).
SCHEME_OPTIONS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "shards": ("classes_per_client",),
    "pathological": ("classes_per_client", "class_assignment"),
    "natural": ("groups",),
}


def partition_schemes() -> tuple[str, ...]:
    """Names accepted by ``partition`` (and the config's data.partition)."""
    return SCHEMES


def _natural_mask(groups: Any, n: int, num_clients: int) -> np.ndarray:
    """The samples of the ``num_clients`` largest groups."""
    if groups is None:
        raise DataError(
            "partition scheme 'natural' needs option groups (a group id per sample; "
            "datasets with natural clients: fortunes, femnist, shakespeare)"
        )
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(
            f"partition option groups must have one id per sample ({n}), got shape {groups.shape}"
        )
    ids, sizes = np.unique(groups, return_counts=True)
    if num_clients > len(ids):
        raise DataError(
            f"partition 'natural': {num_clients} clients but the data has only "
            f"{len(ids)} groups; use num_clients <= {len(ids)}"
        )
    keep = ids[np.argsort(-sizes, kind="stable")[:num_clients]]
    return np.isin(groups, keep)


def partition(
    labels: np.ndarray | Sequence[int], num_clients: int, scheme: str, seed: int = 0, **options: Any
) -> list[np.ndarray]:
    """Split sample indices among ``num_clients``; deterministic given ``seed``.

    Options per scheme are listed in the module docstring (``alpha``, ``min_partition_size``,
    ``self_balancing``, ``classes_per_client``, ``class_assignment``, ``groups``). Returns, per
    client, the sorted int64 indices of its samples; clients are disjoint.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if (
        isinstance(num_clients, bool)
        or not isinstance(num_clients, (int, np.integer))
        or num_clients < 1
    ):
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients, seed = int(num_clients), int(seed)
    if num_clients > len(labels):
        raise DataError(
            f"num_clients ({num_clients}) is more than the number of samples "
            f"({len(labels)}); use fewer clients"
        )
    unknown = sorted(set(options) - set(SCHEME_OPTIONS[scheme]))
    if unknown:
        takes = ", ".join(SCHEME_OPTIONS[scheme]) or "no options"
        raise DataError(
            f"partition scheme {scheme!r} takes no option {unknown[0]!r} (it takes: {takes})"
        )

    columns = {"label": labels, "index": np.arange(len(labels), dtype=np.int64)}
    if scheme == "natural":
        mask = _natural_mask(options.get("groups"), len(labels), num_clients)
        columns = {
            "label": labels[mask],
            "index": np.flatnonzero(mask),
            "group": np.asarray(options["groups"])[mask],
        }
    if scheme in ("iid", "pathological"):  # both split rows in order: shuffle them by seed
        order = np.random.default_rng(seed).permutation(len(labels))
        columns = {k: v[order] for k, v in columns.items()}
    # here, not at the top: a process that only reads a partition made elsewhere (a Ray worker
    # mapping the run's shared data copy) never imports datasets, pyarrow, pandas, matplotlib
    from . import flwr_partitioners

    partitioner = flwr_partitioners.partitioner(
        scheme, columns["label"], num_clients, seed, options
    )
    partitioner.dataset = flwr_partitioners.LabelTable.from_dict(columns)
    try:
        parts = flwr_partitioners.run(partitioner, num_clients)
    except ValueError as exc:
        hint = (
            " (raise alpha, lower min_partition_size, or use fewer clients)"
            if scheme == "dirichlet"
            else ""
        )
        raise DataError(
            f"partition {scheme!r} with {num_clients} clients and options "
            f"{_describe(options)} failed: {exc}{hint}"
        ) from None
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(
                f"partition {scheme!r} left client {i} without data "
                f"(options {_describe(options)}); "
                "use fewer clients, a larger alpha or min_partition_size (dirichlet), a larger "
                "classes_per_client (shards, pathological), or another seed"
            )
    return parts


def _describe(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k != "groups"}
    return ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items())) or "none"


def split_train_val(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's local validation split: ``round(val_fraction * n)`` random indices (sorted).

    At least one sample stays for training; ``val_fraction=0`` gives an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(indices)
    n_val = max(0, min(int(round(val_fraction * len(indices))), len(indices) - 1))  # noqa: RUF046
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """(clients, classes) int64 counts of ``labels`` in each part."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    rows = [
        np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts
    ]
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), np.int64)


def format_histogram(hist: np.ndarray, max_classes: int = 20) -> str:
    """A text table for the CLI: one row per client, one column per class, and totals.

    With more than ``max_classes`` classes (text data) only the first are shown, followed by
    ``...``; the totals still count every class.
    """
    hist = np.atleast_2d(np.asarray(hist, dtype=np.int64))
    shown = hist[:, :max_classes]
    more = "  ..." if hist.shape[1] > max_classes else ""
    pad = " " * len(more)
    width = max(6, len(str(int(hist.max(initial=0)))) + 1)
    total_width = max(8, len(str(int(hist.sum()))) + 2)
    rows = [
        "client"
        + "".join(f"{c:>{width}}" for c in range(shown.shape[1]))
        + more
        + f"{'total':>{total_width}}"
    ]
    for i, row in enumerate(shown):
        rows.append(
            f"{i:>6}"
            + "".join(f"{int(v):>{width}}" for v in row)
            + pad
            + f"{int(hist[i].sum()):>{total_width}}"
        )
    rows.append(
        "total "
        + "".join(f"{int(v):>{width}}" for v in shown.sum(0))
        + pad
        + f"{int(hist.sum()):>{total_width}}"
    )
    return "\n".join(rows)
