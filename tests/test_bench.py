"""``fedalign bench``: reaching a target accuracy, intervals over seeds and the paired comparison
(checked against scipy.stats), the summary's columns and bands, bad suites and seeds named.
The tiny suite through real Flower simulations is tests/integration/test_bench.py."""

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from scipy import stats

from fedalign.cli import main
from fedalign.core.errors import ConfigError
from fedalign.report.intervals import paired, t_interval
from fedalign.runs.bench import COLUMNS, PAIRED, csv_columns, load_suite, reach, summarise_suite
from tests.helpers import ROOT


def test_reach_on_synthetic_rows():
    rows = [
        {"round": 0, "test_accuracy": 0.1, "bytes_down": 0, "bytes_up": 0},
        {"round": 1, "test_accuracy": 0.7, "bytes_down": 10, "bytes_up": 5},
        {"round": 2, "test_accuracy": 0.85, "bytes_down": 10, "bytes_up": 5},
        {"round": 3, "test_accuracy": 0.9, "bytes_down": 10, "bytes_up": 5},
    ]
    assert reach(rows, 0.8) == (2, 30)
    assert reach(rows, 0.95) == (None, None)
    assert reach(rows, 0.05) == (1, 15)  # round 0 (the initial model) does not count


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_interval_and_paired_comparison_agree_with_scipy(n):
    rng = np.random.default_rng(n)
    base = rng.normal(0.8, 0.02, n)
    other = base + rng.normal(0.01, 0.01, n)  # paired: shares the seed's part of the noise
    iv = t_interval(list(other))
    low, high = stats.t.interval(0.95, n - 1, loc=other.mean(), scale=stats.sem(other))
    assert (iv.mean, iv.std, iv.n) == (
        pytest.approx(other.mean()),
        pytest.approx(other.std(ddof=1)),
        n,
    )
    assert (iv.low, iv.high) == (pytest.approx(low), pytest.approx(high))
    # keyed by seed: a seed the baseline lacks is left out of the pairs
    comparison = paired({s: v for s, v in enumerate(other)} | {99: 0.0}, dict(enumerate(base)))
    reference = stats.ttest_rel(other, base)
    ci = reference.confidence_interval(0.95)
    d = comparison.difference
    assert d.n == n and d.mean == pytest.approx((other - base).mean())
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert comparison.p_value == pytest.approx(reference.pvalue)


def test_one_seed_has_no_interval_and_no_shared_seed_no_comparison():
    iv = t_interval([0.5])
    assert (iv.mean, iv.std, iv.low, iv.high, iv.half_width) == (0.5, 0.0, None, None, None)
    assert paired({0: 0.6}, {0: 0.5}).p_value is None
    assert paired({0: 0.6}, {1: 0.5}) is None
    assert paired({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6}).p_value == 0.0  # equal gaps: no noise
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


SUITE = """\
name: synthetic
base: {base}
overrides: [strategy.rounds=4]
target_accuracy: 0.8
strategies:
  fedavg: []
  fedprox: [strategy.name=fedprox, train.proximal_mu=0.01]
partitions: [iid]
variants:
  momentum-0: [train.momentum=0]
  momentum-0.9: [train.momentum=0.9]
baseline: fedavg
"""


def _fake_run(folder, final: float, mib_per_round: float, seconds: float, wall: float) -> None:
    """A finished run folder (metrics rows and summary) whose last round reaches ``final``."""
    run_dir = folder / "run-0"
    run_dir.mkdir(parents=True)
    accuracies = [0.1, final - 0.2, final - 0.05, final - 0.01, final]
    rows = [
        {
            "round": r,
            "test_accuracy": a,
            "bytes_down": 0 if r == 0 else int(mib_per_round * 2**20 / 2),
            "bytes_up": 0 if r == 0 else int(mib_per_round * 2**20 / 2),
            # round 1 also starts the workers; rounds 2..4 have median ``seconds``
            "seconds_total": {0: 0.5, 1: 20 * seconds, 2: 0.5 * seconds}.get(r, seconds),
        }
        for r, a in enumerate(accuracies)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"wall_seconds": wall}))


def test_summary_reports_intervals_paired_differences_and_bands(tmp_path, monkeypatch):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(base=ROOT / "configs/digits_mlp.yaml"))
    suite = load_suite(path, tmp_path / "out")
    assert {r.seed for r in suite.runs} == {0, 1, 2}  # a suite without seeds: 3
    assert suite.runs[0].folder.parts[:4] == ("runs", "mlp", "momentum-0", "iid")
    rng = np.random.default_rng(0)
    finals = {}
    for run in suite.runs:
        final = 0.9 + 0.02 * run.seed + (0.02 if run.strategy == "fedprox" else 0.0)
        final += rng.normal(0, 0.005)  # each run reaches 80% in round 2
        finals[(run.variant, run.strategy, run.seed)] = final
        _fake_run(suite.output / run.folder, final, 2.0, 1.5 + run.seed, 30.0 + run.seed)
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, p, **kw: (figures.append((fig, p)), save(fig, p, **kw))
    )
    summarise_suite(suite)

    with open(suite.output / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == csv_columns(True)
    for c in COLUMNS:
        assert {f"{c.key}_mean", f"{c.key}_ci95_low", f"{c.key}_ci95_high"} <= set(rows[0])
    for k in PAIRED:
        assert {f"{k}_diff_mean", f"{k}_diff_ci95_low", f"{k}_diff_p"} <= set(rows[0])
    row = {(r["variant"], r["strategy"]): r for r in rows}[("momentum-0.9", "fedprox")]
    mine = np.array([finals[("momentum-0.9", "fedprox", s)] for s in range(3)])
    base = np.array([finals[("momentum-0.9", "fedavg", s)] for s in range(3)])
    low, high = stats.t.interval(0.95, 2, loc=mine.mean(), scale=stats.sem(mine))
    assert float(row["final_accuracy_mean"]) == pytest.approx(mine.mean())
    assert float(row["final_accuracy_ci95_low"]) == pytest.approx(low)
    assert float(row["final_accuracy_ci95_high"]) == pytest.approx(high)
    reference = stats.ttest_rel(mine, base)
    ci = reference.confidence_interval(0.95)
    assert float(row["final_accuracy_diff_mean"]) == pytest.approx((mine - base).mean())
    assert float(row["final_accuracy_diff_ci95_low"]) == pytest.approx(ci.low)
    assert float(row["final_accuracy_diff_ci95_high"]) == pytest.approx(ci.high)
    assert float(row["final_accuracy_diff_p"]) == pytest.approx(reference.pvalue)
    assert row["paired_seeds"] == "3" and row["model"] == "mlp"
    assert float(row["mib_total_mean"]) == pytest.approx(8.0)  # 4 rounds of 2 MiB
    # each run's median of rounds 2..4: 1.5, 2.5, 3.5 s for seeds 0, 1, 2
    assert float(row["seconds_per_round_mean"]) == pytest.approx(2.5)
    assert float(row["seconds_per_round_ci95_high"]) == pytest.approx(
        2.5 + stats.t.ppf(0.975, 2) * 1 / math.sqrt(3)
    )
    assert row["reached"] == "3" and row["rounds_to_target_mean"] == "2.0"

    table = (suite.output / "summary.md").read_text()
    assert "95% confidence interval" in table and "Student t" in table and "paired-t" in table
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert "| variant |" in header and "MiB total" in header and "s/round" in header
    half = 100 * (high - mine.mean())
    d = 100 * (mine - base)
    assert (
        f"| mlp | momentum-0.9 | iid | fedprox | 3 | {100 * mine.mean():.2f} ± {half:.2f} |"
        in table
    )
    assert f"{d.mean():+.2f} [{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" in table
    assert "| mlp | momentum-0.9 | iid | fedavg | 3 |" in table and "| baseline |" in table

    assert sorted(p.name for _, p in figures) == [
        "accuracy-mlp-momentum-0-iid.png",
        "accuracy-mlp-momentum-0.9-iid.png",
    ]
    for fig, _ in figures:  # a band per strategy in both panels
        for ax in fig.axes:
            assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2


def test_bad_suites_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: [fedavg]\npartitions: [iid]\n"
        "seed: [1]\n"
    )
    with pytest.raises(ConfigError, match="unknown suite key 'seed'"):
        load_suite(bad)
    bad.write_text("strategies: [fedavg\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 2, column 1: .*"):
        load_suite(bad)
    for seeds in ("[]", "-2", "[1, 1]", "[-1]", "[0.5]"):
        bad.write_text(
            f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: [fedavg]\npartitions: [iid]\n"
            f"seeds: {seeds}\n"
        )
        with pytest.raises(ConfigError, match="seeds: a number of seeds"):
            load_suite(bad)
    bad.write_text(
        f"base: {ROOT / 'configs/digits_mlp.yaml'}\nstrategies: {{fedavg: [train.lr=-1]}}\n"
        "partitions: [iid]\nbaseline: fedavg\n"
    )
    with pytest.raises(ConfigError, match="run iid/fedavg/seed-0: train.lr"):
        load_suite(bad)
    assert main(["bench", str(bad), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # nothing ran
    tiny = str(ROOT / "configs/bench_tiny.yaml")
    with pytest.raises(
        ConfigError, match=r"baseline: 'fedsgd' is not one of .*\(fedavg, fedprox\)"
    ):
        load_suite(tiny, baseline="fedsgd")
    capsys.readouterr()
    for seeds in ("-1", "0"):
        assert main(["bench", tiny, "--output", str(tmp_path / "out"), "--seeds", seeds]) == 2
        assert capsys.readouterr().err == (
            f"fedalign: config error: --seeds: the number of seeds per cell, at least 1; "
            f"got {seeds}\n"
        )
    assert not (tmp_path / "out").exists()
    assert [r.seed for r in load_suite(tiny, seeds=4).runs[:4]] == [0, 1, 2, 3]


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
