"""``fedalign bench``: a tiny suite through real Flower simulations, resumed, summarised (its unit
tests are tests/test_bench.py)."""

import csv
import statistics

import pytest

from fedalign.cli import main
from fedalign.report.results import read_rows
from fedalign.runs.bench import load_suite
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_tiny_suite_runs_resumes_and_summarises(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert (
        main(
            ["bench", str(ROOT / "configs/bench_tiny.yaml"), "--output", str(out), "--no-progress"]
        )
        == 0
    )
    suite = load_suite(ROOT / "configs/bench_tiny.yaml", out)
    folders = sorted(out.glob("runs/*/*/*/seed-*/*/summary.json"))
    assert len(folders) == len(suite.runs) == 8
    # the table: one row per (partition, strategy), with the mean over the two seeds' run folders
    with open(out / "summary.csv") as f:
        records = {(r["partition"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(records) == {(p, s) for p in ("iid", "dirichlet-0.5") for s in ("fedavg", "fedprox")}
    finals = [
        read_rows(p.parent)[-1]["test_accuracy"]
        for p in sorted(out.glob("runs/*/iid/fedavg/*/*/summary.json"))
    ]
    assert len(finals) == 2 and finals[0] != finals[1]  # seeds differ
    assert float(records[("iid", "fedavg")]["final_accuracy_mean"]) == pytest.approx(
        statistics.fmean(finals)
    )
    assert float(records[("iid", "fedavg")]["final_accuracy_std"]) == pytest.approx(
        statistics.stdev(finals)
    )
    assert "| default | iid | fedavg | 2 |" in (out / "summary.md").read_text()
    assert (out / "accuracy-default-iid.png").stat().st_size > 10_000
    # a second invocation finds every run finished and starts none
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl")}
    capsys.readouterr()
    assert (
        main(
            ["bench", str(ROOT / "configs/bench_tiny.yaml"), "--output", str(out), "--no-progress"]
        )
        == 0
    )
    assert capsys.readouterr().out.count("finished before, skipped") == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.jsonl")}
