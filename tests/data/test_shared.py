"""The shared data copy: what a worker maps is the federation the driver wrote, row for row."""

import gc
import weakref

import numpy as np

from fedalign.config.components import run_federation, run_federation_key
from fedalign.config.load import load_config
from fedalign.data import federation, federation_key
from fedalign.data.federation import forget_loaded
from fedalign.data.shared import open_copy, shared_copy, write_copy
from tests.helpers import DIGITS


def _same_federation(a, b) -> None:
    assert a.num_clients == b.num_clients and a.num_classes == b.num_classes
    assert a.input_shape == b.input_shape and a.client_names() == b.client_names()
    for i in range(a.num_clients):
        x, y = a.client(i), b.client(i)
        for name in ("X_train", "y_train", "X_val", "y_val"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (i, name)
            assert getattr(x, name).dtype == getattr(y, name).dtype
    assert all(np.array_equal(p, q) for p, q in zip(a.test, b.test, strict=True))
    assert a.summary() == b.summary()


def test_a_copy_maps_the_same_clients_and_is_removed_after(tmp_path):
    settings = ("digits", 5, "dirichlet", 3, 0.2)
    fed = federation(*settings, alpha=0.5, min_partition_size=5)
    key = federation_key(*settings, alpha=0.5, min_partition_size=5)
    with shared_copy(fed, tmp_path / "copy", key) as path:
        mapped = open_copy(path, key)
        assert mapped is not None and mapped is not fed
        assert isinstance(mapped.train.X, np.memmap)  # mapped, not read into this process
        _same_federation(fed, mapped)
        assert open_copy(path, key) is mapped  # cached per process
        other = federation_key(*settings[:-1], 0.1, alpha=0.5, min_partition_size=5)
        assert open_copy(path, other) is None  # written for other settings: not used
    assert not path.exists()
    assert open_copy(path, key) is None  # gone (or never visible here): not used


def test_a_rewritten_copy_replaces_the_folder(tmp_path):
    fed = federation("digits", 3, "iid", seed=0, val_fraction=0.0)
    key = federation_key("digits", 3, "iid", seed=0, val_fraction=0.0)
    path = write_copy(fed, tmp_path / "copy", key)
    rewritten = write_copy(fed, tmp_path / "copy", key)  # replaces the folder in place
    assert rewritten == path and not list(tmp_path.glob("*.partial-*"))
    _same_federation(fed, open_copy(path, key))


def test_a_driver_that_wrote_the_copy_can_let_its_own_arrays_go(tmp_path):
    """``shared_copy`` keeps no reference to the federation it wrote, ``forget_loaded`` drops
    the process's cached ones: what the driver then reads is the mapped copy (``run_federation``
    given the copy, as the ServerApp reads it), the same federation row for row."""
    cfg = load_config(DIGITS, [])
    fed = run_federation(cfg)
    private = weakref.ref(fed.train.X)
    with shared_copy(fed, tmp_path / "copy", run_federation_key(cfg)) as path:
        _same_federation(fed, run_federation(cfg, str(path)))
        del fed
        forget_loaded()
        gc.collect()
        assert private() is None  # nothing held the driver's own arrays
        served = run_federation(cfg, str(path))
        assert isinstance(served.train.X, np.memmap)
        assert run_federation(cfg, None) is not served  # no copy: loaded here


def test_mapped_arrays_are_writable_and_a_write_stays_in_its_process(tmp_path):
    """torch wraps the mapped arrays without a warning (it warns on read-only ones), and a write
    through them (copy-on-write) does not reach the file other processes map."""
    fed = federation("digits", 3, "iid", seed=0, val_fraction=0.0)
    key = federation_key("digits", 3, "iid", seed=0, val_fraction=0.0)
    path = write_copy(fed, tmp_path / "copy", key)
    X = open_copy(path, key).train.X
    assert isinstance(X, np.memmap) and X.flags.writeable
    original = np.array(X[0])
    X[0] = original + 1.0
    X.flush()
    on_disk = [np.load(f) for f in sorted(path.glob("*.npy"))]
    assert any(a.shape == X.shape and np.array_equal(a[0], original) for a in on_disk)
