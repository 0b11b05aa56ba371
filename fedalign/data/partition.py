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

import contextlib
import hashlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
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

SCHEMES = ("iid", "dirichlet", "shards", "pathological", "natural")
#: Options each scheme takes (``groups`` is the natural scheme's data, not a tuning knob).
SCHEME_OPTIONS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "shards": ("classes_per_client",),
    "pathological": ("classes_per_client", "class_assignment"),
    "natural": ("groups",),
}
CLASS_ASSIGNMENTS = ("first-deterministic", "random", "deterministic")


class _LabelTable(Dataset):
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


def partition_schemes() -> tuple[str, ...]:
    """Names accepted by ``partition`` (and the config's data.partition)."""
    return SCHEMES


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


def _partitioner(
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


def _run(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
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
    partitioner = _partitioner(scheme, columns["label"], num_clients, seed, options)
    partitioner.dataset = _LabelTable.from_dict(columns)
    try:
        parts = _run(partitioner, num_clients)
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
