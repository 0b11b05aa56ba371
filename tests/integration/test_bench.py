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
    finals = {
        strategy: [
            read_rows(p.parent)[-1]["test_accuracy"]
            for p in sorted(out.glob(f"runs/mlp/iid/{strategy}/seed-*/*/summary.json"))
        ]
        for strategy in ("fedavg", "fedprox")
    }
    assert len(finals["fedavg"]) == 2 and finals["fedavg"][0] != finals["fedavg"][1]  # seeds differ
    fedavg, fedprox = records[("iid", "fedavg")], records[("iid", "fedprox")]
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(statistics.fmean(finals["fedavg"]))
    assert float(fedavg["final_accuracy_std"]) == pytest.approx(statistics.stdev(finals["fedavg"]))
    # the paired comparison against the suite's baseline (fedavg), seed by seed
    differences = [p - a for p, a in zip(finals["fedprox"], finals["fedavg"])]
    assert fedprox["baseline"] == "fedavg" and fedprox["paired_seeds"] == "2"
    assert float(fedprox["final_accuracy_diff_mean"]) == pytest.approx(
        statistics.fmean(differences)
    )
    assert float(fedprox["mib_total_mean"]) > 0 and float(fedprox["seconds_per_round_mean"]) > 0
    assert "| mlp | iid | fedavg | 2 |" in (out / "summary.md").read_text()
    assert (out / "accuracy-mlp-iid.png").stat().st_size > 10_000
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


@pytest.fixture(scope="module")
def suite_on_the_session_ray(shared_ray, tmp_path_factory):
    """A suite of two runs on the session's Ray (``fedalign bench`` in a process where a block of
    ``one_ray`` is open), before ``own_ray`` stops it; with the pools it built and reused."""
    from fedalign.runs.bench import run_suite
    from fedalign.runs.shared_ray import one_ray

    folder = tmp_path_factory.mktemp("suite")
    (folder / "suite.yaml").write_text(
        f"base: {ROOT / 'configs/digits_mlp.yaml'}\n"
        "overrides: [strategy.rounds=2, train.local_epochs=1, strategy.fraction_train=0.5]\n"
        "strategies: {fedavg: [], scaffold: [strategy.name=scaffold]}\n"
        "partitions: {iid: []}\n"
        "seeds: [1]\n"
    )
    suite = load_suite(folder / "suite.yaml", folder / "suite")
    before = (shared_ray.built, shared_ray.reused)
    with one_ray() as session:
        assert session is shared_ray  # the open block's Ray, left running
        run_suite(suite, progress=False)
    return suite, (shared_ray.built - before[0], shared_ray.reused - before[1])


def test_a_suite_shares_one_ray_with_the_metrics_of_separate_starts(
    suite_on_the_session_ray, own_ray, tmp_path
):
    """The runs of a suite share one Ray and one actor pool, and each run's metrics are those of
    the same config started on its own (Flower starting and stopping Ray: ``own_ray``). The
    second run finds the actors the first (and the session's runs before) used; SCAFFOLD keeps
    state on its clients (``Context.state``), which must start empty in every run."""
    import ray

    from fedalign.runs.runner import run

    suite, (built, reused) = suite_on_the_session_ray
    assert built <= 1 and built + reused == 2  # one pool at most, found again by the second run
    assert not ray.is_initialized()  # own_ray stopped it, as a suite's ``one_ray`` does at its end
    keys = ("test_accuracy", "test_loss", "train_loss", "clients_sampled", "bytes_down", "bytes_up")
    second = suite.runs[1]
    alone = run(second.cfg, output_dir=tmp_path / "alone", progress=False)
    (in_suite,) = (suite.output / second.folder).glob("*/metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in read_rows(in_suite.parent)] == [
        {k: r[k] for k in keys} for r in read_rows(alone.run_dir)
    ]
