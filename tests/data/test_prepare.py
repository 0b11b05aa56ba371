"""``fedalign data prepare``: Fashion-MNIST is prepared like the hub datasets (its four files copied
from a genuine local copy, or downloaded), and a run never forces the hub offline."""

from __future__ import annotations

import pytest

from fedalign.cli import main
from fedalign.data import fashion_mnist
from fedalign.runs.runner import QUIET_ENV


@pytest.mark.skipif(
    not any(
        all(fashion_mnist._file_in(d, n) for n in fashion_mnist.FILES.values())
        for d in fashion_mnist.search_dirs()
    ),
    reason="needs a local Fashion-MNIST copy (Debian's dataset-fashion-mnist)",
)
def test_prepare_fashion_mnist_copies_the_verified_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # its decoded copy stays here
    assert main(["data", "prepare", "fashion-mnist", "--to", str(tmp_path)]) == 0
    target = tmp_path / "fashion-mnist"
    assert f"data.data_dir={target}" in capsys.readouterr().out
    assert fashion_mnist.verify_dir(target) == dict.fromkeys(fashion_mnist.FILES.values(), True)
    X, y = fashion_mnist.load("test", target)
    assert X.shape[0] == y.shape[0] == 10_000


def test_a_run_leaves_the_hub_online_setting_to_the_user():
    """A user with a network gets the download the README promises; offline is the user's call."""
    assert not {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"} & set(QUIET_ENV)
