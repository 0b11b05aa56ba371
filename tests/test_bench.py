"""``fedalign bench``: reaching a target accuracy, mean and spread over seeds, bad suites named.
The tiny suite through real Flower simulations is tests/integration/test_bench.py."""

import statistics

import pytest

from fedalign.cli import main
from fedalign.core.errors import ConfigError
from fedalign.runs.bench import load_suite, mean_std, reach
from tests.helpers import ROOT


def test_reach_and_mean_std_on_synthetic_rows():
    rows = [
        {"round": 0, "test_accuracy": 0.1, "bytes_down": 0, "bytes_up": 0},
        {"round": 1, "test_accuracy": 0.7, "bytes_down": 10, "bytes_up": 5},
        {"round": 2, "test_accuracy": 0.85, "bytes_down": 10, "bytes_up": 5},
        {"round": 3, "test_accuracy": 0.9, "bytes_down": 10, "bytes_up": 5},
    ]
    assert reach(rows, 0.8) == (2, 30)
    assert reach(rows, 0.95) == (None, None)
    assert reach(rows, 0.05) == (1, 15)  # round 0 (the initial model) does not count
    assert mean_std([1.0, 2.0, 4.0]) == (
        pytest.approx(7 / 3),
        pytest.approx(statistics.stdev([1, 2, 4])),
    )
    assert mean_std([3.0]) == (3.0, 0.0)


def test_bad_suites_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: [fedavg]\npartitions: [iid]\n"
        "seed: [1]\n"
    )
    with pytest.raises(ConfigError, match="unknown suite key 'seed'"):
        load_suite(bad)
    bad.write_text(
        f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: {{fedavg: [train.lr=-1]}}\n"
        "partitions: [iid]\n"
    )
    with pytest.raises(ConfigError, match="run default/iid/fedavg/seed-0: train.lr"):
        load_suite(bad)
    assert main(["bench", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # nothing ran


def test_summary_only_without_finished_runs_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "suite"
    assert (
        main(
            ["bench", str(ROOT / "configs/bench_tiny.yaml"), "--output", str(out), "--summary-only"]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"fedalign: {out}: no finished run of suite tiny to summarise "
        "(run the suite without --summary-only first)\n"
    )
    assert not out.exists()
