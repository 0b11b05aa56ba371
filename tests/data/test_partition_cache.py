"""Stored partitions: a later run reads the parts an earlier one drew (the same parts, the same
warnings) without importing Hugging Face ``datasets``, and a stored file that is not a partition
of these labels is drawn again, never trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedalign.data import partition_cache
from fedalign.data.datasets import dataset_arrays
from fedalign.data.partition import partition
from fedalign.data.partition_cache import cached_partition, partition_key, partitions_dir
from tests.helpers import fresh_python

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 classes
GROUPS = np.arange(600) % 7
SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3, "min_partition_size": 5}),
    ("shards", {"classes_per_client": 2}),
    ("pathological", {"classes_per_client": 3}),
    ("natural", {"groups": GROUPS}),
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def stored_path(num_clients: int, scheme: str, seed: int, **options):
    return partitions_dir() / f"{partition_key(LABELS, num_clients, scheme, seed, options)}.npz"


def refuse_to_draw(*args, **kwargs):
    raise AssertionError("drew the partition again instead of reading the stored one")


def equal_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) and y.dtype == np.int64 for x, y in zip(a, b)
    )


@pytest.mark.filterwarnings("ignore:partition 'pathological'")
@pytest.mark.parametrize(("scheme", "options"), SCHEMES, ids=[s for s, _ in SCHEMES])
def test_a_stored_partition_is_read_back_as_drawn(scheme, options, monkeypatch) -> None:
    drawn = partition(LABELS, 5, scheme, 3, **options)
    first = cached_partition(LABELS, 5, scheme, 3, **options)
    assert stored_path(5, scheme, 3, **options).is_file()
    monkeypatch.setattr(partition_cache, "partition", refuse_to_draw)
    assert equal_parts(drawn, first)
    assert equal_parts(drawn, cached_partition(LABELS, 5, scheme, 3, **options))


def test_the_key_holds_everything_that_draws_the_partition() -> None:
    base = partition_key(LABELS, 5, "dirichlet", 0, {"alpha": 0.5})
    assert base == partition_key(LABELS.copy(), np.int64(5), "dirichlet", 0, {"alpha": 0.5})
    others = {
        partition_key(LABELS[::-1].copy(), 5, "dirichlet", 0, {"alpha": 0.5}),
        partition_key(LABELS.astype(np.int32), 5, "dirichlet", 0, {"alpha": 0.5}),
        partition_key(LABELS, 6, "dirichlet", 0, {"alpha": 0.5}),
        partition_key(LABELS, 5, "iid", 0, {}),
        partition_key(LABELS, 5, "dirichlet", 1, {"alpha": 0.5}),
        partition_key(LABELS, 5, "dirichlet", 0, {"alpha": 0.4}),
        partition_key(LABELS, 5, "natural", 0, {"groups": GROUPS}),
        partition_key(LABELS, 5, "natural", 0, {"groups": GROUPS[::-1].copy()}),
    }
    assert base not in others and len(others) == 8


def test_the_partitioners_warnings_are_repeated_when_read_back(monkeypatch) -> None:
    # two clients with one class each leave eight classes to nobody
    with pytest.warns(UserWarning, match="not assigned to any client"):
        drawn = cached_partition(LABELS, 2, "pathological", 0, classes_per_client=1)
    monkeypatch.setattr(partition_cache, "partition", refuse_to_draw)
    with pytest.warns(UserWarning, match="not assigned to any client"):
        read = cached_partition(LABELS, 2, "pathological", 0, classes_per_client=1)
    assert equal_parts(drawn, read)


def archive(indices, sizes, notes=()) -> dict:
    return {"indices": indices, "sizes": sizes, "warnings": np.array(list(notes), dtype=str)}


BAD_FILES = {
    "not an archive": b"not a zip file",
    "overlapping parts": archive(np.array([0, 1, 2, 1, 3]), np.array([3, 2, 0, 0, 0])),
    "an index past the labels": archive(np.array([0, 600]), np.array([2, 0, 0, 0, 0])),
    "an unsorted part": archive(np.array([2, 1]), np.array([2, 0, 0, 0, 0])),
    "sizes that do not add up": archive(np.array([0, 1, 2]), np.array([2, 2, 0, 0, 0])),
    "a part too few": archive(np.array([0, 1]), np.array([1, 1, 0, 0])),
    "float indices": archive(np.array([0.0, 1.0]), np.array([2, 0, 0, 0, 0])),
    "a missing array": {"indices": np.array([0, 1]), "sizes": np.array([2, 0, 0, 0, 0])},
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_stored_file_that_is_no_partition_of_these_labels_is_drawn_again(content) -> None:
    path = stored_path(5, "iid", 0)
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **{k: np.asarray(v) for k, v in content.items()})
    assert equal_parts(partition(LABELS, 5, "iid", 0), cached_partition(LABELS, 5, "iid", 0))
    with np.load(path, allow_pickle=False) as rewritten:  # the good partition replaced it
        assert int(rewritten["sizes"].sum()) == len(LABELS)


class CreatesAFileWhenUnpickled:
    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_stored_file_holding_pickles_is_drawn_again_without_unpickling(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    objects = np.array([CreatesAFileWhenUnpickled(marker)] * 2, dtype=object)
    bad = archive(objects, np.array([2, 0, 0, 0, 0]))
    np.savez(tmp_path / "probe.npz", **bad)
    with np.load(tmp_path / "probe.npz", allow_pickle=True) as probe:
        probe["indices"]  # what unpickling the file does
    assert marker.exists()
    marker.unlink()
    path = stored_path(5, "iid", 0)
    path.parent.mkdir(parents=True)
    np.savez(path, **bad)
    assert equal_parts(partition(LABELS, 5, "iid", 0), cached_partition(LABELS, 5, "iid", 0))
    assert not marker.exists()
    with np.load(path, allow_pickle=False) as rewritten:
        assert rewritten["indices"].dtype == np.int64


def test_a_cache_that_cannot_be_written_leaves_the_partition_as_drawn(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # fedalign/partitions cannot be made
    assert equal_parts(partition(LABELS, 5, "iid", 0), cached_partition(LABELS, 5, "iid", 0))


def test_a_run_that_reads_a_stored_partition_never_imports_hugging_face_datasets() -> None:
    # drawn here, read back by a fresh interpreter (a run's driver) through federation()
    labels = dataset_arrays("digits", "train").y
    drawn = cached_partition(labels, 5, "dirichlet", 0, alpha=0.5)
    code = (
        "import json, sys\n"
        "from fedalign.data import federation\n"
        "f = federation('digits', 5, 'dirichlet', seed=0, alpha=0.5)\n"
        "print(json.dumps([[len(t) + len(v) for t, v in f.splits], 'datasets' in sys.modules]))\n"
    )
    assert json.loads(fresh_python(code)) == [[len(p) for p in drawn], False]
