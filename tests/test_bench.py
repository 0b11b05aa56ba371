"""``fedalign bench``: a tiny suite through real Flower simulations, resumed, summarised."""

import csv
import statistics
from pathlib import Path

import pytest

from fedalign.bench import load_suite, mean_std, reach
from fedalign.cli import main
from fedalign.config import ConfigError
from fedalign.results import read_rows

ROOT = Path(__file__).resolve().parents[1]


def test_reach_and_mean_std_on_synthetic_rows():
    rows = [{"round": 0, "test_accuracy": 0.1, "bytes_down": 0, "bytes_up": 0},
            {"round": 1, "test_accuracy": 0.7, "bytes_down": 10, "bytes_up": 5},
            {"round": 2, "test_accuracy": 0.85, "bytes_down": 10, "bytes_up": 5},
            {"round": 3, "test_accuracy": 0.9, "bytes_down": 10, "bytes_up": 5}]
    assert reach(rows, 0.8) == (2, 30)
    assert reach(rows, 0.95) == (None, None)
    assert reach(rows, 0.05) == (1, 15)            # round 0 (the initial model) does not count
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_bad_suites_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: [fedavg]\npartitions: [iid]\nseed: [1]\n")
    with pytest.raises(ConfigError, match="unknown suite key 'seed'"):
        load_suite(bad)
    bad.write_text(f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: {{fedavg: [train.lr=-1]}}\n"
                   "partitions: [iid]\n")
    with pytest.raises(ConfigError, match="run default/iid/fedavg/seed-0: train.lr"):
        load_suite(bad)
    assert main(["bench", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()                     # nothing ran


@pytest.mark.integration
def test_tiny_suite_runs_resumes_and_summarises(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["bench", str(ROOT / "configs/bench_tiny.yaml"), "--output", str(out), "--no-progress"]) == 0
    suite = load_suite(ROOT / "configs/bench_tiny.yaml", out)
    folders = sorted(out.glob("runs/*/*/*/seed-*/*/summary.json"))
    assert len(folders) == len(suite.runs) == 8
    # the table: one row per (partition, strategy), with the mean over the two seeds' run folders
    with open(out / "summary.csv") as f:
        records = {(r["partition"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(records) == {(p, s) for p in ("iid", "dirichlet-0.5") for s in ("fedavg", "fedprox")}
    finals = [read_rows(p.parent)[-1]["test_accuracy"] for p in sorted(out.glob("runs/*/iid/fedavg/*/*/summary.json"))]
    assert len(finals) == 2 and finals[0] != finals[1]          # seeds differ
    assert float(records[("iid", "fedavg")]["final_accuracy_mean"]) == pytest.approx(statistics.fmean(finals))
    assert float(records[("iid", "fedavg")]["final_accuracy_std"]) == pytest.approx(statistics.stdev(finals))
    assert "| default | iid | fedavg | 2 |" in (out / "summary.md").read_text()
    assert (out / "accuracy-default-iid.png").stat().st_size > 10_000
    # a second invocation finds every run finished and starts none
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl")}
    capsys.readouterr()
    assert main(["bench", str(ROOT / "configs/bench_tiny.yaml"), "--output", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl")}
