"""Loaders, partitions and federations: shapes, counts, determinism, skew and clear errors."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedalign.data import (
    DataError,
    DatasetNotFoundError,
    dataset_arrays,
    federation,
    format_histogram,
    label_histogram,
    load_dataset,
    partition,
)
from fedalign.data import fashion_mnist
from fedalign.data.idx import read_idx
from fedalign.data.text import VOCAB_SIZE, decode, encode

FMNIST = fashion_mnist.DEBIAN_DIR
needs_fmnist = pytest.mark.skipif(
    not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (make data)"
)


@needs_fmnist
def test_fashion_mnist_shapes_counts_and_range():
    X, y = load_dataset("fashion-mnist", "train")
    assert X.shape == (60_000, 1, 28, 28) and X.dtype == np.float32
    assert y.shape == (60_000,) and y.dtype == np.int64
    assert 0.0 <= X.min() and X.max() == 1.0
    assert np.bincount(y).tolist() == [6000] * 10
    X_test, y_test = load_dataset("fashion-mnist", "test")
    assert X_test.shape == (10_000, 1, 28, 28) and np.bincount(y_test).tolist() == [1000] * 10


def test_digits_shapes_and_split():
    X, y = load_dataset("digits", "train")
    X_test, y_test = load_dataset("digits", "test")
    assert X.shape[1:] == (1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    assert len(y) + len(y_test) == 1797 and abs(len(y_test) - 0.2 * 1797) < 2
    assert 0.0 <= X.min() and X.max() <= 1.0 and set(np.unique(y)) == set(range(10))


def test_fortunes_windows_vocab_and_groups():
    arrays = dataset_arrays("fortunes", "train")
    X, y = arrays.X, arrays.y
    assert X.ndim == 2 and X.shape[1] == 80 and X.dtype == np.int64 and len(y) == len(X)
    assert 0 <= X.min() and X.max() < VOCAB_SIZE == arrays.num_classes
    assert arrays.groups is not None and len(arrays.group_names) == arrays.groups.max() + 1 >= 10
    assert "computers" in arrays.group_names
    text = "A penny saved.\n\t-- Ben"
    assert decode(encode(text)) == text
    assert encode("é").tolist() == [0]


def test_unknown_dataset_is_named():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


# ---- IDX validation ---------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_round_trip(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", data)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), data)


def test_truncated_idx_is_reported(tmp_path):
    data = np.zeros((5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t.gz", data)
    raw = gzip.decompress((tmp_path / "t.gz").read_bytes())
    (tmp_path / "t.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"t.gz: truncated: expected 3936 bytes .* got 3836"):
        read_idx(tmp_path / "t.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "t.gz").read_bytes()[:30])
    with pytest.raises(DataError, match="corrupted or truncated"):
        read_idx(tmp_path / "cut.gz")


def test_wrong_magic_is_reported(tmp_path):
    (tmp_path / "w.gz").write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(100)))
    with pytest.raises(DataError, match="wrong magic number"):
        read_idx(tmp_path / "w.gz")


def test_missing_fashion_mnist_without_network_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDALIGN_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "network_available", lambda *a, **k: False)
    with pytest.raises(DatasetNotFoundError, match="apt install dataset-fashion-mnist") as info:
        fashion_mnist.locate(tmp_path / "given")
    assert str(tmp_path / "given") in str(info.value)


@needs_fmnist
def test_data_dir_takes_precedence(tmp_path):
    for name in fashion_mnist.FILES.values():
        (tmp_path / name).write_bytes((FMNIST / name).read_bytes())
    assert fashion_mnist.locate(tmp_path) == tmp_path


# ---- partitions -------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 200)


@pytest.mark.parametrize("scheme, options", [
    ("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"classes_per_client": 2}),
])
def test_partitions_are_deterministic_disjoint_and_covering(scheme, options):
    parts = partition(LABELS, 8, scheme, seed=3, **options)
    again = partition(LABELS, 8, scheme, seed=3, **options)
    other = partition(LABELS, 8, scheme, seed=4, **options)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)


def test_dirichlet_skew_shows_in_label_histograms():
    def skew(scheme, **options):
        hist = label_histogram(LABELS, partition(LABELS, 10, scheme, seed=0, **options), 10)
        shares = hist / hist.sum(1, keepdims=True)
        return np.abs(shares - 0.1).sum(1).mean()      # mean total-variation from uniform x 2

    iid, mild, strong = skew("iid"), skew("dirichlet", alpha=5.0), skew("dirichlet", alpha=0.1)
    assert iid < 0.2 and iid < mild < strong and strong > 1.0


def test_pathological_gives_k_classes_per_client():
    parts = partition(LABELS, 10, "pathological", seed=0, classes_per_client=2)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert set(np.unique(LABELS[np.concatenate(parts)])) == set(range(10))


def test_natural_partition_follows_groups():
    groups = np.repeat(np.arange(5), [50, 40, 30, 20, 10])
    labels = np.arange(150) % 3
    parts = partition(labels, 3, "natural", groups=groups)
    assert sorted(len(p) for p in parts) == [30, 40, 50]
    assert all(len(np.unique(groups[p])) == 1 for p in parts)
    with pytest.raises(DataError, match="only 5 groups"):
        partition(labels, 6, "natural", groups=groups)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_clients": 3000, "scheme": "iid"}, "more than the number of samples"),
    ({"num_clients": 4, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ({"num_clients": 4, "scheme": "dirichlet", "alpha": -1}, "alpha must be > 0"),
    ({"num_clients": 4, "scheme": "zipf"}, "unknown partition scheme 'zipf'"),
    ({"num_clients": 4, "scheme": "iid", "alpha": 0.3}, "takes no option 'alpha'"),
    ({"num_clients": 4, "scheme": "natural"}, "needs per-sample groups"),
])
def test_bad_partition_options_are_named(kwargs, message):
    with pytest.raises(DataError, match=message):
        partition(LABELS, **kwargs)


def test_federation_views_and_summary():
    fed = federation("digits", 4, "dirichlet", seed=1, val_fraction=0.2, alpha=1.0, min_partition_size=5)
    assert fed is federation("digits", 4, "dirichlet", seed=1, val_fraction=0.2, alpha=1.0,
                             min_partition_size=5)            # cached per process
    sizes = [len(fed.client(i).y_train) + len(fed.client(i).y_val) for i in range(4)]
    assert sum(sizes) == len(load_dataset("digits")[1])
    c = fed.client(0)
    assert abs(len(c.y_val) - 0.2 * sizes[0]) <= 1 and c.X_train.shape[1:] == (1, 8, 8)
    summary = fed.summary()
    assert np.array(summary["label_histogram"]).sum(1).tolist() == sizes
    assert "total" in format_histogram(fed.histogram())
    with pytest.raises(DataError, match="client 4 does not exist"):
        fed.client(4)
