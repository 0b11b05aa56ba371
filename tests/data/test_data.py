"""Loaders, partitions and federations: shapes, counts, determinism, skew and clear errors."""

import gzip
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedalign.data import (
    DataError,
    DatasetNotFoundError,
    dataset_arrays,
    fashion_mnist,
    federation,
    format_histogram,
    label_histogram,
    load_dataset,
    partition,
    split_train_val,
    text,
)
from fedalign.data.idx import read_idx
from fedalign.data.text import VOCAB_SIZE, decode, encode

FMNIST = fashion_mnist.DEBIAN_DIR
needs_fmnist = pytest.mark.skipif(
    not all((FMNIST / n).is_file() for n in fashion_mnist.FILES.values()),
    reason=(
        f"Debian's dataset-fashion-mnist is not installed in {FMNIST} "
        "(apt install dataset-fashion-mnist)"
    ),
)
needs_fortunes = pytest.mark.skipif(
    not text.FORTUNES_DIR.is_dir(), reason=f"Debian's fortunes corpus is not in {text.FORTUNES_DIR}"
)


# ---- loaders ----------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_shapes_counts_and_range():
    X, y = load_dataset("fashion-mnist", "train")
    assert X.shape == (60_000, 1, 28, 28) and X.dtype == np.float32
    assert y.shape == (60_000,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert np.bincount(y).tolist() == [6000] * 10
    X_test, y_test = load_dataset("fashion-mnist", "test")
    assert X_test.shape == (10_000, 1, 28, 28) and np.bincount(y_test).tolist() == [1000] * 10
    arrays = dataset_arrays("fashion-mnist", "test")
    assert arrays.X is X_test  # decoded once per process
    assert arrays.num_classes == 10 and arrays.input_shape == (1, 28, 28) and arrays.groups is None


@needs_fmnist
def test_debian_copies_are_the_official_data():
    assert fashion_mnist.verify_dir(FMNIST) == {n: True for n in fashion_mnist.FILES.values()}
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        raw = gzip.decompress((FMNIST / name).read_bytes())
        assert hashlib.md5(raw).hexdigest() == fashion_mnist.RAW_MD5[name]  # published raw MD5


def test_digits_shapes_and_split():
    X, y = load_dataset("digits", "train")
    X_test, y_test = load_dataset("digits", "test")
    assert X.shape == (1437, 1, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    assert len(y_test) == 360 and X_test.shape[1:] == (1, 8, 8)
    assert X.min() == 0.0 and X.max() == 1.0 and set(np.unique(y)) == set(range(10))
    assert (
        np.abs(np.bincount(y) / len(y) - np.bincount(y_test) / len(y_test)).max() < 0.01
    )  # stratified
    assert np.array_equal(load_dataset("digits", "test")[1], y_test)  # fixed split


@needs_fortunes
def test_fortunes_windows_vocab_and_groups():
    train, test = dataset_arrays("fortunes", "train"), dataset_arrays("fortunes", "test")
    X, y, g = train.X, train.y, train.groups
    assert X.shape[1] == 80 and X.dtype == np.int64 and y.dtype == np.int64 and len(y) == len(X)
    assert 50_000 <= len(y) <= 150_000 and 0.15 < len(test.y) / (len(y) + len(test.y)) < 0.25
    assert 0 <= X.min() and X.max() < VOCAB_SIZE == train.num_classes <= 98
    assert train.group_names == test.group_names and "computers" in train.group_names
    assert g.dtype == np.int64 and set(np.unique(g)) == set(range(len(train.group_names)))
    assert set(np.unique(test.groups)) == set(
        range(len(train.group_names))
    )  # every category tested
    # Windows (stride 16) of one category overlap, and the label is the character that follows.
    same = np.flatnonzero(g[:-1] == g[1:])
    assert np.array_equal(X[same + 1][:, :64], X[same][:, 16:])
    assert np.array_equal(y[same], X[same + 1][:, 64])
    text_ = "A penny saved.\n\t-- Ben"
    assert decode(encode(text_)) == text_ and encode("é~").tolist() == [0, 97]


def _write_fortunes(directory: Path) -> None:
    directory.mkdir()
    (directory / "alpha").write_text("%\n".join(f"fortune {i} of alpha\n" for i in range(40)))
    (directory / "beta").write_text("%\n".join(f"beta says {i}\n" for i in range(20)))
    (directory / "tiny").write_text("too short\n")
    (directory / "alpha.dat").write_bytes(b"\x00\x02index")
    (directory / "alpha.u8").symlink_to("alpha")
    (directory / "off").mkdir()
    (directory / "off" / "rude").write_text("never read\n" * 100)


def test_fortunes_from_a_directory(tmp_path):
    _write_fortunes(tmp_path / "corpus")
    train = dataset_arrays("fortunes", "train", tmp_path / "corpus", seq_len=10, stride=5)
    test = dataset_arrays("fortunes", "test", tmp_path / "corpus", seq_len=10, stride=5)
    assert train.group_names == ("alpha", "beta")  # .dat, .u8, off/ and too short skipped
    alpha = "\n".join(f"fortune {i} of alpha" for i in range(40))  # '%' lines removed
    cut = int(0.8 * len(alpha))
    assert (train.groups == 0).sum() == (cut - 11) // 5 + 1
    assert decode(train.X[0]) == alpha[:10] and decode(train.y[:1]) == alpha[10]
    assert decode(test.X[test.groups == 0][0]) == alpha[cut : cut + 10]
    with pytest.raises(DataError, match="seq_len and stride must be >= 1"):
        dataset_arrays("fortunes", "train", tmp_path / "corpus", stride=0)


def test_unknown_dataset_option_and_split_are_named():
    with pytest.raises(
        DataError, match="unknown dataset 'cifar'; choose one of fashion-mnist, digits, fortunes"
    ):
        load_dataset("cifar")
    with pytest.raises(DataError, match="dataset 'digits' takes no option 'seq_len'"):
        dataset_arrays("digits", seq_len=20)
    with pytest.raises(DataError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset("digits", "val")


# ---- IDX files and Fashion-MNIST lookup ---------------------------------------------------------


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0B: ">i2"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(dtype).tobytes()


def test_idx_round_trip_gzipped_and_raw(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(data)))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), data)
    wide = np.array([[-300, 2], [7, 30000]], dtype=np.int16)
    (tmp_path / "b").write_bytes(_idx_bytes(wide, 0x0B))  # raw, big-endian int16
    out = read_idx(tmp_path / "b")
    assert out.dtype == np.int16 and np.array_equal(out, wide)


def test_truncated_idx_is_reported(tmp_path):
    raw = _idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))
    (tmp_path / "t.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(
        DataError, match=r"t\.gz: truncated: expected 3936 bytes for shape \(5, 28, 28\).* got 3836"
    ):
        read_idx(tmp_path / "t.gz")
    (tmp_path / "long").write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="long: too long: expected 3936 bytes"):
        read_idx(tmp_path / "long")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:30])  # gzip stream cut short
    with pytest.raises(
        DataError, match=r"cut\.gz: cannot be decompressed .*corrupted or truncated"
    ):
        read_idx(tmp_path / "cut.gz")


def test_wrong_magic_and_type_code_are_reported(tmp_path):
    (tmp_path / "w.gz").write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(100)))
    with pytest.raises(DataError, match=r"w\.gz: not an IDX file \(wrong magic number: 89504e47"):
        read_idx(tmp_path / "w.gz")
    (tmp_path / "code").write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataError, match="unknown type code 0x07"):
        read_idx(tmp_path / "code")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="an empty file"):
        read_idx(tmp_path / "empty")


def _fake_fmnist(
    directory: Path, n_train: int = 6, n_test: int = 4, side: int = 28
) -> dict[str, bytes]:
    """Small IDX files under the official names; returns their gzipped bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = {}
    for (split, kind), name in fashion_mnist.FILES.items():
        n = n_train if split == "train" else n_test
        array = rng.integers(0, 256, (n, side, side)) if kind == "images" else np.arange(n) % 10
        blobs[name] = gzip.compress(_idx_bytes(array.astype(np.uint8)))
        (directory / name).write_bytes(blobs[name])
    return blobs


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Debian's directory, the cache and the environment point at empty temporary places."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDALIGN_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "network_available", lambda *a, **k: False)
    return tmp_path


def _load_fresh(directory: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A split as a new process would load it (the per-process cache emptied)."""
    fashion_mnist._read_split.cache_clear()
    return fashion_mnist.load(split, data_dir=directory)


def _npy(array: np.ndarray, archive: bool = False) -> bytes:
    """The bytes of ``array`` saved as ``.npy`` (or, with ``archive``, in an ``.npz``)."""
    buffer = io.BytesIO()
    if archive:
        np.savez(buffer, X=array)
    else:
        np.save(buffer, array)
    return buffer.getvalue()


def _refuse_to_decode(*args):
    raise AssertionError("decoded the split again instead of mapping the stored one")


def test_a_split_is_decoded_once_then_mapped_copy_on_write(no_default_dirs, monkeypatch):
    _fake_fmnist(no_default_dirs / "given")
    X, y = _load_fresh(no_default_dirs / "given")
    stored = sorted(p.name.split("-")[0] for p in fashion_mnist.decoded_dir().iterdir())
    assert stored == ["train", "train"]  # images and labels
    monkeypatch.setattr(fashion_mnist, "_decode", _refuse_to_decode)
    X2, y2 = _load_fresh(no_default_dirs / "given")
    assert isinstance(X2, np.memmap) and X2.dtype == np.float32
    assert X2.tobytes() == X.tobytes() and y2.tolist() == y.tolist()
    X2[0] = 7.0  # a write stays in this process: the stored split is unchanged
    assert _load_fresh(no_default_dirs / "given")[0].tobytes() == X.tobytes()


def test_changed_files_or_a_bad_stored_split_are_decoded_again(no_default_dirs, monkeypatch):
    given = no_default_dirs / "given"
    _fake_fmnist(given)
    _load_fresh(given)
    _fake_fmnist(given, n_train=5)  # the files changed: their split is decoded again
    assert len(_load_fresh(given)[0]) == 5
    stored = sorted(p.name for p in fashion_mnist.decoded_dir().glob("train-*"))
    assert len(stored) == 2 and stored[0][:-6] == stored[1][:-6]  # the old split was removed
    decoded, decode = [], fashion_mnist._decode
    monkeypatch.setattr(
        fashion_mnist, "_decode", lambda *paths: decoded.append(1) or decode(*paths)
    )
    stem = fashion_mnist._decoded_stem(
        "train", *(given / fashion_mnist.FILES[("train", kind)] for kind in ("images", "labels"))
    )
    images, labels = Path(f"{stem}-X.npy"), Path(f"{stem}-y.npy")
    bad = {
        "truncated": lambda: images.write_bytes(images.read_bytes()[:200]),
        "wrong dtype": lambda: np.save(images, np.zeros((5, 1, 28, 28), np.float64)),
        "wrong shape": lambda: np.save(images, np.zeros((5, 28, 28), np.float32)),
        "labels too few": lambda: np.save(labels, np.zeros(4, np.int64)),
        "a label out of range": lambda: np.save(labels, np.full(5, 10, np.int64)),
        "pickled labels": lambda: np.save(labels, np.array([0, 1, 2, 3, None]), allow_pickle=True),
        "a zip archive": lambda: images.write_bytes(_npy(np.zeros(5), archive=True)),
        "a negative shape": lambda: images.write_bytes(
            _npy(np.zeros((5, 1, 28, 28), np.float32)).replace(b"(5, 1", b"(-5,1", 1)
        ),
        "no images": lambda: (
            np.save(images, np.zeros((0, 1, 28, 28), np.float32)),
            np.save(labels, np.zeros(0, np.int64)),
        ),
    }
    for count, (name, spoil) in enumerate(bad.items(), 1):
        spoil()
        X5, y5 = _load_fresh(given)
        assert len(decoded) == count, name
        assert X5.shape == (5, 1, 28, 28) and y5.tolist() == list(range(5)), name
    assert _load_fresh(given)[1].tolist() == list(range(5))
    assert len(decoded) == len(bad)  # the last bad file was rewritten: mapped, not decoded


def test_files_rewritten_with_their_size_and_modification_time_are_decoded_again(
    no_default_dirs,
):
    given = no_default_dirs / "given"
    _fake_fmnist(given)
    X, _ = _load_fresh(given)
    images = given / fashion_mnist.FILES[("train", "images")]
    before = images.stat()
    array = np.full((6, 28, 28), 255, np.uint8)
    images.write_bytes(gzip.compress(_idx_bytes(array), mtime=0).ljust(before.st_size, b"\0"))
    os.utime(images, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert images.stat().st_size == before.st_size
    assert _load_fresh(given)[0].min() == 1.0 != X.min()


def test_an_unwritable_cache_leaves_the_load_as_it_was(no_default_dirs, monkeypatch):
    _fake_fmnist(no_default_dirs / "given")
    blocker = no_default_dirs / "blocker"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    X, _ = _load_fresh(no_default_dirs / "given")
    assert X.shape == (6, 1, 28, 28) and not isinstance(X, np.memmap)


def test_data_dir_and_env_are_looked_up_first(no_default_dirs, monkeypatch):
    _fake_fmnist(no_default_dirs / "given")
    X, y = load_dataset("fashion-mnist", "train", data_dir=no_default_dirs / "given")
    assert X.shape == (6, 1, 28, 28) and X.dtype == np.float32 and 0 <= X.min() and X.max() <= 1
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    _fake_fmnist(no_default_dirs / "env", n_train=3)
    monkeypatch.setenv("FEDALIGN_DATA_DIR", str(no_default_dirs / "env"))
    assert fashion_mnist.locate() == no_default_dirs / "env"
    assert fashion_mnist.locate(no_default_dirs / "given") == no_default_dirs / "given"
    assert len(load_dataset("fashion-mnist")[1]) == 3


def test_fashion_mnist_files_of_the_wrong_shape_are_reported(no_default_dirs):
    _fake_fmnist(no_default_dirs / "small", side=8)
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte\.gz: expected uint8 images of shape \(n, 28, 28\)",
    ):
        load_dataset("fashion-mnist", data_dir=no_default_dirs / "small")


def test_missing_fashion_mnist_without_network_says_where_and_how(no_default_dirs):
    with pytest.raises(DatasetNotFoundError, match="apt install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    for place in ("debian", "cache/fedalign/fashion-mnist"):
        assert str(no_default_dirs / place) in message
    assert "no network" in message and "data_dir" in message
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_an_incomplete_data_dir_names_the_missing_files_and_is_not_replaced(no_default_dirs):
    """A data_dir the user chose is the data: it never silently falls back to another copy."""
    (no_default_dirs / "given").mkdir()
    (no_default_dirs / "given" / "train-images-idx3-ubyte.gz").write_bytes(b"only one file")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=no_default_dirs / "given")
    assert str(info.value).endswith(
        "lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )


def test_download_is_verified_before_use(no_default_dirs, monkeypatch):
    blobs = _fake_fmnist(no_default_dirs / "server")
    for name, blob in blobs.items():  # pretend the fake files are the official ones
        monkeypatch.setitem(fashion_mnist.OFFICIAL_GZ_MD5, name, hashlib.md5(blob).hexdigest())
    monkeypatch.setattr(fashion_mnist, "network_available", lambda *a, **k: True)
    served = dict(blobs, **{"t10k-labels-idx1-ubyte.gz": b"\x1f\x8b tampered"})
    monkeypatch.setattr(fashion_mnist, "_fetch", lambda url, timeout: served[url.rsplit("/", 1)[1]])
    cache = no_default_dirs / "cache" / "fedalign" / "fashion-mnist"
    with pytest.raises(
        DataError, match=r"could not download t10k-labels-idx1-ubyte\.gz:\n.*checksum mismatch"
    ):
        fashion_mnist.locate()
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists() and not list(cache.glob("*.part"))
    served.update(blobs)  # the mirror serves the right file again
    assert fashion_mnist.locate() == cache
    assert fashion_mnist.verify_dir(cache) == {n: True for n in blobs}
    assert load_dataset("fashion-mnist", "test")[1].tolist() == [0, 1, 2, 3]


# ---- partitions -------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 10 balanced classes


def _check_disjoint(parts, covering):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) and all(p.dtype == np.int64 for p in parts)
    assert all(np.array_equal(p, np.sort(p)) and len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(joined), covering)


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5}),
        ("dirichlet", {"alpha": 0.5, "self_balancing": True, "min_partition_size": 50}),
        ("shards", {"classes_per_client": 2}),
        ("pathological", {"classes_per_client": 3}),
        ("natural", {"groups": np.arange(2000) % 13}),
    ],
)
def test_partitions_are_deterministic_disjoint_and_covering(scheme, options):
    parts = partition(LABELS, 10, scheme, seed=3, **options)
    again = partition(LABELS, 10, scheme, seed=3, **options)
    assert len(parts) == 10 and all(np.array_equal(a, b) for a, b in zip(parts, again))
    if scheme != "natural":  # natural follows the groups, not the seed
        other = partition(LABELS, 10, scheme, seed=4, **options)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
        _check_disjoint(parts, np.arange(len(LABELS)))
    else:  # the 10 largest of 13 groups: ids 0..9
        _check_disjoint(parts, np.flatnonzero(options["groups"] < 10))


def test_dirichlet_skew_shows_in_label_histograms():
    def skew(scheme, **options):
        """Mean total-variation distance between a client's label shares and the uniform ones."""
        hist = label_histogram(LABELS, partition(LABELS, 10, scheme, seed=0, **options), 10)
        shares = hist / hist.sum(1, keepdims=True)
        return 0.5 * np.abs(shares - 0.1).sum(1).mean()

    iid, mild, strong = skew("iid"), skew("dirichlet", alpha=100.0), skew("dirichlet", alpha=0.1)
    assert iid < 0.1 and mild < 0.15 and strong > 0.5 and strong > 5 * iid


def test_shards_and_pathological_limit_classes_per_client():
    aligned = partition(LABELS, 10, "shards", seed=1, classes_per_client=2)  # shards of 100
    assert max(len(np.unique(LABELS[p])) for p in aligned) <= 2
    assert {len(p) for p in aligned} == {200}
    straddling = partition(LABELS, 7, "shards", seed=1, classes_per_client=2)  # shards of 142
    assert max(len(np.unique(LABELS[p])) for p in straddling) <= 4
    assert sum(map(len, straddling)) == 2000 - 2000 % 14
    for n, k in ((7, 2), (10, 3), (25, 1)):
        parts = partition(LABELS, n, "pathological", seed=1, classes_per_client=k)
        assert all(len(np.unique(LABELS[p])) == k for p in parts)
    with pytest.warns(UserWarning, match="not assigned to any client"):  # 3 x 2 < 10 classes
        partition(LABELS, 3, "pathological", seed=1, classes_per_client=2)


def test_natural_partition_follows_groups():
    groups = np.repeat(np.arange(5), [50, 40, 30, 20, 40])
    labels = np.arange(180) % 3
    parts = partition(labels, 3, "natural", groups=groups)
    assert [np.unique(groups[p]).tolist() for p in parts] == [[0], [1], [4]]  # largest, by id
    assert [len(p) for p in parts] == [50, 40, 40]
    with pytest.raises(DataError, match="6 clients but the data has only 5 groups"):
        partition(labels, 6, "natural", groups=groups)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"num_clients": 3000, "scheme": "iid"},
            r"num_clients \(3000\) is more than the number of samples \(2000\)",
        ),
        ({"num_clients": 0, "scheme": "iid"}, "num_clients must be an integer >= 1"),
        (
            {"num_clients": 4, "scheme": "dirichlet", "alpha": 0.0},
            "option alpha must be a number > 0, got 0.0",
        ),
        (
            {"num_clients": 4, "scheme": "dirichlet", "alpha": -1},
            "option alpha must be a number > 0",
        ),
        (
            {"num_clients": 40, "scheme": "dirichlet", "min_partition_size": 60},
            "min_partition_size=60 is impossible",
        ),
        (
            {"num_clients": 4, "scheme": "zipf"},
            "unknown partition scheme 'zipf'; choose one of iid, dirichlet",
        ),
        ({"num_clients": 4, "scheme": "iid", "alpha": 0.3}, "scheme 'iid' takes no option 'alpha'"),
        (
            {"num_clients": 4, "scheme": "shards", "classes_per_client": 11},
            r"classes_per_client must be an integer in \[1, 10\]",
        ),
        (
            {"num_clients": 4, "scheme": "pathological", "class_assignment": "greedy"},
            "class_assignment must be one of",
        ),
        ({"num_clients": 4, "scheme": "natural"}, "'natural' needs option groups"),
    ],
)
def test_bad_partition_options_are_named(kwargs, message):
    with pytest.raises(DataError, match=message):
        partition(LABELS, **kwargs)


def test_empty_client_is_named_with_a_remedy():
    with pytest.raises(
        DataError, match=r"left client \d+ without data.*fewer clients, a larger alpha"
    ):
        partition(LABELS[:100], 60, "dirichlet", seed=0, alpha=0.05, min_partition_size=0)


def test_split_train_val():
    idx = np.arange(100, 150)
    tr, va = split_train_val(idx, 0.2, seed=5)
    assert (
        len(va) == 10 and len(tr) == 40 and np.array_equal(np.sort(np.concatenate([tr, va])), idx)
    )
    assert np.array_equal(va, split_train_val(idx, 0.2, seed=5)[1])
    assert not np.array_equal(va, split_train_val(idx, 0.2, seed=6)[1])
    tr, va = split_train_val(idx, 0.0, seed=5)
    assert len(va) == 0 and np.array_equal(tr, idx)
    tr, va = split_train_val(np.array([7, 9]), 0.9, seed=0)
    assert len(tr) == 1 and len(va) == 1  # one sample always stays to train
    with pytest.raises(DataError, match="val_fraction must be in"):
        split_train_val(idx, 1.0, seed=0)


def test_label_histogram_and_its_table():
    labels = np.array([0, 0, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 2]), np.array([1, 3, 4, 5])], 4)
    assert hist.tolist() == [[1, 1, 0, 0], [1, 0, 3, 0]]
    lines = format_histogram(hist).splitlines()
    assert lines[0].split() == ["client", "0", "1", "2", "3", "total"]
    assert lines[1].split() == ["0", "1", "1", "0", "0", "2"]
    assert lines[-1].split() == ["total", "2", "1", "3", "0", "6"]
    wide = format_histogram(np.ones((2, 30), dtype=int)).splitlines()
    assert "..." in wide[0] and wide[-1].split()[-1] == "60"
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        label_histogram(labels, [np.arange(6)], 2)


# ---- federations ------------------------------------------------------------------------------


def test_federation_views_and_summary():
    fed = federation(
        "digits", 4, "dirichlet", seed=1, val_fraction=0.2, alpha=1.0, min_partition_size=5
    )
    assert fed is federation(
        "digits", 4, "dirichlet", seed=1, val_fraction=0.2, min_partition_size=5, alpha=1.0
    )  # cached per process, option order aside
    assert fed is not federation(
        "digits", 4, "dirichlet", seed=2, val_fraction=0.2, alpha=1.0, min_partition_size=5
    )
    X_all, y_all = load_dataset("digits")
    sizes = [len(fed.client(i).y_train) + len(fed.client(i).y_val) for i in range(4)]
    assert sum(sizes) == len(y_all)
    c = fed.client(0)
    tr, va = fed.splits[0]
    assert np.array_equal(c.X_train, X_all[tr]) and np.array_equal(c.y_val, y_all[va])
    assert abs(len(c.y_val) - 0.2 * sizes[0]) <= 1 and c.X_train.shape[1:] == (1, 8, 8)
    assert fed.num_classes == 10 and fed.test[0].shape == (360, 1, 8, 8)
    summary = json.loads(json.dumps(fed.summary()))
    assert summary["options"] == {"alpha": 1.0, "min_partition_size": 5} and summary["seed"] == 1
    assert np.array(summary["label_histogram"]).sum(1).tolist() == sizes
    assert [a + b for a, b in zip(summary["train_sizes"], summary["val_sizes"])] == sizes
    assert "total" in format_histogram(fed.histogram())
    with pytest.raises(DataError, match="client 4 does not exist"):
        fed.client(4)
    with pytest.raises(DataError, match="alpha must be a number"):  # a list is a key, then refused
        federation("digits", 4, "dirichlet", alpha=[0.5, 0.5])


def test_natural_federation_uses_the_categories(tmp_path):
    _write_fortunes(tmp_path / "corpus")
    fed = federation(
        "fortunes",
        2,
        "natural",
        seed=0,
        val_fraction=0.0,
        data_dir=tmp_path / "corpus",
        dataset_options={"seq_len": 10, "stride": 5},
    )
    assert fed.client_names() == ["alpha", "beta"] and fed.input_shape == (10,)
    assert len(fed.client(0).y_val) == 0
    groups = fed.train.groups
    assert all(np.all(groups[fed.parts[i]] == i) for i in range(2))
    assert fed.summary()["client_names"] == ["alpha", "beta"]
    with pytest.raises(DataError, match="'natural' needs a dataset with natural groups"):
        federation("digits", 2, "natural")
