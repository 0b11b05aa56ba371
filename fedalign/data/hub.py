"""Federated benchmarks from the Hugging Face hub: CIFAR-10, FEMNIST, Shakespeare and ``hf:<repo>``.

Each dataset is declared once (``HubDataset``): its hub repository, its columns, its modality's
preprocessing (``modality.Images`` / ``modality.Characters``), the column that names its natural
clients, and how a test split is cut when the copy has only a training split:

- ``cifar10`` (``uoft-cs/cifar10``): ``img``/``label``, 50,000 + 10,000 RGB 32x32 images, 10
  classes, normalised with the per-channel mean and std FedMA's reference code uses.
- ``femnist`` (``flwrlabs/femnist``, LEAF's FEMNIST): ``image``/``character``/``writer_id``,
  28x28 greyscale, 62 classes, one natural client per writer; a training split only, so each
  writer's samples are split 90/10 at random (seed 0), as LEAF's ``--by_sample --tf 0.9`` does.
- ``shakespeare`` (``flwrlabs/shakespeare``, LEAF's Shakespeare): ``x`` (80 characters) / ``y``
  (the next one) / ``character_id`` (the speaking role: the natural client), LEAF's 80-character
  set; each role's first 80% of samples train and the rest test, less the 79 samples after the cut
  whose windows overlap the training text (LEAF's ``split_data.py`` for Shakespeare).
- ``hf:<org>/<name>``: any image-classification dataset; the image and label columns are the
  single ``Image`` and ``ClassLabel`` features unless options name them.

Loads go through ``local_copy`` (a local copy first; the network only where it exists) and are
cached per process with both splits, since a Ray worker builds every client from them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import local_copy
from .errors import DataError
from .modality import Characters, Images

HF_PREFIX = "hf:"
#: A hub dataset's name: ``hf:<repo-id>``, the id one or two non-empty parts.
HF_NAME_PATTERN = r"^hf:[^/\s]+(/[^/\s]+)?$"
#: FedMA's reference normalisation for CIFAR-10 (``transforms.Normalize`` of its data loader).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass(frozen=True)
class Holdout:
    """A test split cut from each group's training samples: ``fraction`` of them, at random
    (``seed``) or, ``ordered``, the last ones after dropping ``gap`` samples at the cut."""

    fraction: float
    ordered: bool = False
    gap: int = 0
    seed: int = 0

    def test_mask(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train mask, test mask) over samples with group ids ``groups``; per group, the
        training share is ``max(1, int((1 - fraction) * n))`` samples, as LEAF counts it."""
        n = len(groups)
        order = np.argsort(groups, kind="stable")
        if not self.ordered:  # a random order within each group
            keys = np.random.default_rng(self.seed).random(n)
            order = np.lexsort((keys, groups))
        sorted_groups = groups[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        sizes = np.diff(np.r_[starts, n])
        rank = np.arange(n) - np.repeat(starts, sizes)
        n_train = np.maximum(1, ((1 - self.fraction) * sizes).astype(np.int64))
        cut = np.repeat(n_train, sizes)
        train, test = np.zeros(n, bool), np.zeros(n, bool)
        train[order] = rank < cut
        test[order] = rank >= cut + self.gap
        return train, test


@dataclass(frozen=True)
class HubDataset:
    """One dataset on the hub and how fedalign turns it into arrays."""

    repo: str
    inputs: Images | Characters
    label: str | None = None  # the class column (None: the text's next character)
    group: str | None = None  # the natural client of each sample
    num_classes: int | None = None  # None: from the label column's ClassLabel feature
    holdout: Holdout = field(default_factory=lambda: Holdout(0.2))

    @property
    def columns(self) -> tuple[str, ...]:
        extra = tuple(c for c in (self.label, self.group) if c is not None)
        return (*self.inputs.columns(), *extra)


BUILTIN = {
    "cifar10": HubDataset(
        repo="uoft-cs/cifar10",
        inputs=Images("img", channels=3, size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD),
        label="label",
        num_classes=10,
    ),
    "femnist": HubDataset(
        repo="flwrlabs/femnist",
        inputs=Images("image", channels=1, size=28),
        label="character",
        group="writer_id",
        num_classes=62,
        holdout=Holdout(0.1),
    ),
    "shakespeare": HubDataset(
        repo="flwrlabs/shakespeare",
        inputs=Characters("x", "y", seq_len=80),
        group="character_id",
        holdout=Holdout(0.2, ordered=True, gap=79),
    ),
}


def folder_name(name: str) -> str:
    """The folder a copy of dataset ``name`` lives in: ``cifar10``, or ``org--repo`` for
    ``hf:org/repo``."""
    return name.removeprefix(HF_PREFIX).replace("/", "--")


def hf_repo(name: str) -> str:
    """The repository of an ``hf:<repo-id>`` name (one clear error when it has none)."""
    if re.fullmatch(HF_NAME_PATTERN, name) is None:
        raise DataError(f"dataset {name!r}: write a hub dataset as hf:<org>/<name>")
    return name.removeprefix(HF_PREFIX)


@dataclass(frozen=True)
class Split:
    """One split as arrays (what ``datasets.Arrays`` is built from)."""

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    groups: np.ndarray | None
    group_names: tuple[str, ...] | None


def _class_count(source: HubDataset, table: pa.Table) -> int:
    if source.num_classes is not None:
        return source.num_classes
    if isinstance(source.inputs, Characters):
        return source.inputs.num_classes
    import datasets

    feature = datasets.Features.from_arrow_schema(table.schema).get(source.label)
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(table.column(source.label).to_numpy().max()) + 1


def _labels(source: HubDataset, table: pa.Table, where: str, num_classes: int) -> np.ndarray:
    if isinstance(source.inputs, Characters):
        return source.inputs.labels(table, where)
    column = table.column(source.label)
    if not pa.types.is_integer(column.type):
        raise DataError(f"{where}: label column {source.label!r} holds {column.type}, not ids")
    y = column.to_numpy().astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{where}: label {int(y.max() if y.max() >= num_classes else y.min())} in column "
            f"{source.label!r} is outside 0..{num_classes - 1}"
        )
    return y


def _check_columns(source: HubDataset, tables: dict[str, pa.Table], where: str) -> None:
    if "train" not in tables:
        raise DataError(f"{where}: the copy has no training split (files or a 'train' split)")
    for split, table in tables.items():
        missing = [c for c in source.columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{where}: the {split} split has no column {missing[0]!r} (it has "
                f"{', '.join(table.column_names)}); is this a copy of {source.repo}?"
            )


@functools.lru_cache(maxsize=2)
def load(name: str, source: HubDataset, data_dir: str | None) -> dict[str, Split]:
    """Both splits of dataset ``name`` (declared by ``source``), cached per process."""
    folder = folder_name(name)
    directory = local_copy.locate(name, folder, source.repo, data_dir)
    where = f"{name} copy {directory}"
    text = source.inputs.columns() if isinstance(source.inputs, Characters) else ()
    tables = local_copy.read(directory, (*text, *((source.group,) if source.group else ())))
    _check_columns(source, tables, where)
    num_classes = _class_count(source, tables["train"])
    arrays = {
        split: (
            source.inputs.inputs(table, directory, f"{where} ({split})"),
            _labels(source, table, f"{where} ({split})", num_classes),
        )
        for split, table in tables.items()
    }
    groups, names = None, None
    if source.group is not None:
        values = [
            tables[s].column(source.group).to_numpy(zero_copy_only=False).astype(str)
            for s in tables
        ]
        unique, inverse = np.unique(np.concatenate(values), return_inverse=True)
        names = tuple(unique.tolist())
        bounds = np.cumsum([0, *(len(v) for v in values)])
        groups = {s: inverse[a:b].astype(np.int64) for s, a, b in zip(tables, bounds, bounds[1:])}
    if "test" not in arrays:
        (X, y), g = (
            arrays["train"],
            groups["train"] if groups else np.zeros(len(arrays["train"][1])),
        )
        train, test = source.holdout.test_mask(np.asarray(g, dtype=np.int64))
        if not test.any():
            raise DataError(
                f"{where}: too small to cut a test split ({source.holdout}); it has only "
                f"{len(y)} samples"
            )
        arrays = {"train": (X[train], y[train]), "test": (X[test], y[test])}
        if groups:
            groups = {"train": groups["train"][train], "test": groups["train"][test]}
    return {
        split: Split(X, y, num_classes, None if groups is None else groups[split], names)
        for split, (X, y) in arrays.items()
    }


def generic(
    repo: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    test_fraction: float = 0.2,
) -> HubDataset:
    """The declaration of an ``hf:<repo>`` image dataset; unnamed columns are found from the
    copy's features when it is read (``resolve_generic``)."""
    if not 0 < test_fraction < 1:
        raise DataError(f"hf:{repo}: test_fraction must be in (0, 1), got {test_fraction}")
    return HubDataset(
        repo=repo,
        inputs=Images(image_column or "", channels=channels, size=image_size),
        label=label_column or "",
        group=group_column,
        holdout=Holdout(test_fraction),
    )


@functools.lru_cache(maxsize=4)
def resolve_generic(name: str, source: HubDataset, data_dir: str | None) -> HubDataset:
    """``source`` with its empty image/label column names found from the copy's features: the
    single ``Image`` and the single ``ClassLabel`` column (else an error asking for the option)."""
    if source.inputs.column and source.label:
        return source
    import dataclasses

    import datasets

    directory = local_copy.locate(name, folder_name(name), source.repo, data_dir)
    train = local_copy.read(directory).get("train")
    if train is None:
        raise DataError(f"{name} copy {directory}: it has no training split")
    features = datasets.Features.from_arrow_schema(train.schema)
    found = {}
    for option, kind, given in (
        ("image_column", datasets.Image, source.inputs.column),
        ("label_column", datasets.ClassLabel, source.label),
    ):
        if given:
            found[option] = given
            continue
        matches = [c for c, f in features.items() if isinstance(f, kind)]
        if len(matches) != 1:
            raise DataError(
                f"{name}: {len(matches) or 'no'} {kind.__name__} columns in {directory} "
                f"({', '.join(features)}); name one with data.options.{option}"
            )
        found[option] = matches[0]
    return dataclasses.replace(
        source,
        inputs=dataclasses.replace(source.inputs, column=found["image_column"]),
        label=found["label_column"],
    )


def split_arrays(name: str, split: str, data_dir: str | Path | None, **options) -> Split:
    """One split of a registered hub dataset or of ``hf:<repo>`` (``options``: ``generic``'s)."""
    directory = None if data_dir is None else str(data_dir)
    if name in BUILTIN:
        return load(name, BUILTIN[name], directory)[split]
    source = resolve_generic(name, generic(hf_repo(name), **options), directory)
    return load(name, source, directory)[split]


def source_of(name: str) -> HubDataset:
    """The declaration of hub dataset ``name`` (``hf:<repo>`` with its columns still unnamed)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith(HF_PREFIX):
        return generic(hf_repo(name))
    raise DataError(
        f"{name!r} is not a hub dataset; choose one of {', '.join(BUILTIN)} or hf:<org>/<name>"
    )


def prepare(name: str, to: str | Path) -> Path:
    """Download hub dataset ``name`` once and store it as ``to/<folder>`` (``fedalign data
    prepare``); one clear error where there is no network."""
    return local_copy.prepare(name, folder_name(name), source_of(name).repo, to)
