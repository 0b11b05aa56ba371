"""CIFAR-10, FEMNIST and Shakespeare through the real loading code, from tiny copies with the hub's
schemas (tests/data/hub_copies.py): preprocessing, held-out test splits, partitions, where copies
are looked for, and the one line a missing copy gives without a network."""

import json
import time

import numpy as np
import pytest
from datasets import load_from_disk

from fedalign.cli import main
from fedalign.config.load import load_config
from fedalign.core.errors import ConfigError
from fedalign.data import (
    DataError,
    DatasetNotFoundError,
    dataset_arrays,
    dataset_options,
    federation,
    hub,
    label_histogram,
    local_copy,
)
from fedalign.data.modality import LEAF_LETTERS
from tests.data import hub_copies
from tests.helpers import CONFIGS

HUB = ("cifar10", "femnist", "shakespeare")


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """One root holding the three tiny copies as ``save_to_disk`` folders."""
    root = tmp_path_factory.mktemp("hub")
    for name in HUB:
        hub_copies.write(name, root)
    return root


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No default place holds a copy, and the hub cannot be reached."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("FEDALIGN_DATA_DIR", raising=False)
    monkeypatch.setattr(local_copy, "hub_reachable", lambda *a, **k: False)
    hub.load.cache_clear()
    yield tmp_path
    hub.load.cache_clear()


def _source_rows(root, name):
    return load_from_disk(str(root / name))["train"]


# ---- preprocessing ------------------------------------------------------------------------------


def test_cifar10_images_are_normalised_rgb_32x32(copies):
    train, test = (dataset_arrays("cifar10", s, copies) for s in ("train", "test"))
    assert train.X.shape == (120, 3, 32, 32) and train.X.dtype == np.float32
    assert test.X.shape == (40, 3, 32, 32) and train.num_classes == 10
    assert train.y.dtype == np.int64 and np.bincount(train.y).tolist() == [12] * 10
    mean = np.asarray(hub.CIFAR10_MEAN, np.float32)[:, None, None]
    std = np.asarray(hub.CIFAR10_STD, np.float32)[:, None, None]
    raw = np.asarray(_source_rows(copies, "cifar10")[0]["img"], np.float32).transpose(2, 0, 1)
    np.testing.assert_allclose(train.X[0] * std + mean, raw / 255, atol=1e-6)
    assert train.groups is None and train.input_shape == (3, 32, 32)


def test_femnist_62_classes_writers_and_leafs_90_10_split(copies):
    train, test = (dataset_arrays("femnist", s, copies) for s in ("train", "test"))
    rows = _source_rows(copies, "femnist")
    assert train.X.shape[1:] == (1, 28, 28) and train.X.dtype == np.float32
    assert 0.0 <= train.X.min() and train.X.max() <= 1.0 and train.num_classes == 62
    assert train.group_names == tuple(sorted(set(rows["writer_id"])))
    sizes = np.bincount(np.unique(rows["writer_id"], return_inverse=True)[1])
    held_out = sizes - np.maximum(1, (0.9 * sizes).astype(int))  # LEAF's per-writer count
    assert np.bincount(test.groups, minlength=len(sizes)).tolist() == held_out.tolist()
    assert len(train.y) + len(test.y) == len(rows)
    assert sorted(np.r_[train.y, test.y].tolist()) == sorted(rows["character"])


def test_shakespeare_windows_are_leaf_ids_split_without_overlap(copies):
    train, test = (dataset_arrays("shakespeare", s, copies) for s in ("train", "test"))
    rows = _source_rows(copies, "shakespeare")
    assert train.X.shape[1:] == (80,) and train.X.dtype == np.int64 and train.num_classes == 80
    assert 0 <= train.X.min() and train.X.max() < 80
    first = "".join(LEAF_LETTERS[i] for i in train.X[0])
    assert first == rows[0]["x"] and LEAF_LETTERS[train.y[0]] == rows[0]["y"]
    for g, name in enumerate(train.group_names):
        n = rows["character_id"].count(name)
        n_train = int(0.8 * n)
        assert (train.groups == g).sum() == n_train  # the role's first 80%, in order
        assert (test.groups == g).sum() == n - n_train - 79  # windows after the cut overlap


def test_characters_outside_leafs_set_get_the_last_id(tmp_path, nowhere):
    rows = hub_copies.shakespeare_rows(roles=1, chars=500)
    rows["x"][0] = "é" + rows["x"][0][1:]
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_dict(rows)).save_to_disk(str(tmp_path / "shakespeare"))
    X = dataset_arrays("shakespeare", "train", tmp_path).X
    assert X[0, 0] == 79 and LEAF_LETTERS[X[0, 1]] == rows["x"][0][1]


@pytest.mark.parametrize("name,form", [("cifar10", "parquet"), ("shakespeare", "csv")])
def test_parquet_and_csv_copies_give_the_same_arrays(copies, tmp_path, name, form):
    hub_copies.write(name, tmp_path, form)
    for split in ("train", "test"):
        a, b = dataset_arrays(name, split, copies), dataset_arrays(name, split, tmp_path)
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.y, b.y)


# ---- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,scheme,options",
    [
        ("cifar10", "iid", {}),
        ("cifar10", "dirichlet", {"alpha": 0.5, "min_partition_size": 5}),
        ("cifar10", "shards", {"classes_per_client": 2}),
        ("femnist", "dirichlet", {"alpha": 1.0, "min_partition_size": 5}),
        ("femnist", "natural", {}),
        ("shakespeare", "natural", {}),
        ("shakespeare", "iid", {}),
    ],
)
def test_partitions_deterministic_disjoint_covering(copies, name, scheme, options):
    fed = federation(name, 3, scheme, seed=7, data_dir=str(copies), **options)
    again = federation(name, 3, scheme, seed=7, data_dir=str(copies / name), **options)
    assert all(np.array_equal(a, b) for a, b in zip(fed.parts, again.parts, strict=True))
    joined = np.concatenate(fed.parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    n = len(fed.train)
    if scheme in ("iid", "dirichlet"):
        assert sorted(joined.tolist()) == list(range(n))  # covering
    elif scheme == "shards":  # every shard is used; n mod (clients x shards) rows are left
        assert n - len(joined) < 3 * 2
    summary = fed.summary()
    np.testing.assert_array_equal(
        summary["label_histogram"], label_histogram(fed.train.y, fed.parts, fed.num_classes)
    )
    for part, n_train, n_val in zip(
        fed.parts, summary["train_sizes"], summary["val_sizes"], strict=True
    ):
        assert n_train + n_val == len(part) and n_val == round(0.1 * len(part))
    json.dumps(summary)


@pytest.mark.parametrize("name", ["femnist", "shakespeare"])
def test_natural_partition_follows_the_id_column(copies, name):
    fed = federation(name, 3, "natural", data_dir=str(copies))
    groups = fed.train.groups
    owned = [np.unique(groups[p]) for p in fed.parts]
    assert all(len(o) == 1 for o in owned)  # one writer / role per client
    sizes = np.bincount(groups)
    largest = np.argsort(-sizes, kind="stable")[:3]
    assert sorted(int(o[0]) for o in owned) == sorted(largest.tolist())
    for part, o in zip(fed.parts, owned, strict=True):
        assert len(part) == sizes[o[0]]  # all of its samples
    assert fed.client_names() == [fed.train.group_names[int(o[0])] for o in owned]


# ---- where copies are looked for ----------------------------------------------------------------


def test_env_root_fedalign_cache_and_hub_cache_are_found(copies, nowhere, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDALIGN_DATA_DIR", str(copies))
    assert local_copy.find("cifar10", "uoft-cs/cifar10", None) == copies / "cifar10"
    monkeypatch.delenv("FEDALIGN_DATA_DIR")
    assert local_copy.find("cifar10", "uoft-cs/cifar10", None) is None
    snapshot = tmp_path / "hf" / "datasets--uoft-cs--cifar10" / "snapshots" / "abc123"
    hub_copies.write("cifar10", snapshot, "parquet")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert local_copy.find("cifar10", "uoft-cs/cifar10", None) == snapshot
    assert dataset_arrays("cifar10", "test").X.shape == (40, 3, 32, 32)


def test_hf_repo_names_infer_image_and_label_columns(copies, nowhere, tmp_path):
    hub_copies.write("cifar10", tmp_path / "root")
    (tmp_path / "root" / "cifar10").rename(tmp_path / "root" / "someone--tiny-images")
    arrays = dataset_arrays("hf:someone/tiny-images", "train", tmp_path / "root")
    assert arrays.X.shape == (120, 3, 32, 32) and arrays.num_classes == 10
    assert 0.0 <= arrays.X.min() and arrays.X.max() <= 1.0  # no normalisation declared
    assert "image_column" in dataset_options("hf:someone/tiny-images")
    hub_copies.write("femnist", tmp_path / "root")
    (tmp_path / "root" / "femnist").rename(tmp_path / "root" / "someone--writers")
    train = dataset_arrays(
        "hf:someone/writers", "train", tmp_path / "root", group_column="writer_id"
    )
    assert train.num_classes == 62 and train.group_names[0] == "f0000_10"
    with pytest.raises(
        DataError, match="no Image columns .*name one with data.options.image_column"
    ):
        dataset_arrays("hf:someone/other", "train", copies / "shakespeare")


def test_wrong_copy_names_the_missing_column(copies, nowhere):
    with pytest.raises(DataError, match="no column 'img'.*is this a copy of uoft-cs/cifar10"):
        dataset_arrays("cifar10", "train", copies / "femnist")


@pytest.mark.parametrize("name", HUB)
def test_no_copy_and_no_network_is_one_line_within_seconds(nowhere, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as info:
        dataset_arrays(name, "train", nowhere)
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert "\n" not in message and f"fedalign data prepare {name} --to DIR" in message
    assert "HF_HUB_OFFLINE=1" in message and str(nowhere / name) in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DatasetNotFoundError, match="huggingface.co is unreachable"):
        dataset_arrays(name, "train", nowhere)


def test_prepare_without_network_exits_2_with_one_line(nowhere, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "prepare", "shakespeare", "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flwrlabs/shakespeare" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()
    assert main(["data", "prepare", "digits", "--to", str(tmp_path)]) == 2
    assert "not a hub dataset" in capsys.readouterr().err


def test_config_checks_hub_names_and_dataset_options(copies):
    base = CONFIGS / "cifar10_lenet_fedavg.yaml"
    cfg = load_config(base, [f"data.data_dir={copies}"])
    assert cfg.data.dataset == "cifar10" and cfg.data.options == {}
    with pytest.raises(ConfigError, match="data.dataset: unknown dataset 'hf:a/b/c'"):
        load_config(base, ["data.dataset=hf:a/b/c"])
    with pytest.raises(ConfigError, match="data.options: dataset 'cifar10' takes no option"):
        load_config(base, ["data.options.image_column=img"])
    cfg = load_config(base, ["data.dataset=hf:org/x", "data.options.image_column=picture"])
    assert cfg.data.options == {"image_column": "picture"}
