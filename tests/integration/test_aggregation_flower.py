"""The align -> fuse -> repair pipeline through a real Flower simulation on Ray (digits), one
test per phase pattern: train only, train + align, train + repair."""

import pytest

from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

ONE_SHOT = [
    "strategy.rounds=1",
    "aggregation.own_init=true",
    "data.partition=dirichlet",
    "data.alpha=0.5",
    "data.val_fraction=0.0",
    "train.local_epochs=10",
    "aggregation.stats_samples=300",
]


def _run(tmp_path, name, overrides):
    cfg = load_config(ROOT / "configs/digits_mlp.yaml", [f"name={name}", *ONE_SHOT, *overrides])
    rows = read_rows(run(cfg, output_dir=tmp_path, progress=False).run_dir)
    return rows[-1]


def test_train_phase_only_weight_matching_and_regmean(tmp_path):
    plain = _run(tmp_path, "plain", [])  # one-shot average of independent inits
    # one-shot from independent inits: the output layer solved too (RegMean's one-shot setting)
    row = _run(
        tmp_path,
        "wm-regmean",
        [
            "aggregation.align=weight",
            "aggregation.fuse=regmean",
            "aggregation.regmean_output=regmean",
        ],
    )
    assert row["aggregation"]["fuse"] == "regmean" and row["clients_ok"] == 4
    assert set(row["bytes_by_phase"]) == {"train"}
    # the Grams travel up with the weights: more bytes up than down
    assert row["bytes_up"] > row["bytes_down"]
    assert row["test_accuracy"] > plain["test_accuracy"] + 0.1, (
        row["test_accuracy"],
        plain["test_accuracy"],
    )


def test_align_phase_activation_matching_and_fisher(tmp_path):
    row = _run(
        tmp_path,
        "act-fisher",
        [
            "aggregation.align=activation",
            "aggregation.fuse=fisher",
            "aggregation.fisher_labels=exact",
        ],
    )
    assert set(row["bytes_by_phase"]) == {"train", "align"}
    assert row["clients_ok"] == 4 and row["clients_failed"] == 0
    # the reference and the client's own model go down to the 3 other clients
    assert row["bytes_by_phase"]["align"]["down"] > 3 * 2 * 4 * (64 * 64 + 64 * 10)
    assert row["test_accuracy"] > 0.5


def test_repair_phase_after_weight_matching(tmp_path):
    row = _run(tmp_path, "wm-repair", ["aggregation.align=weight", "aggregation.repair=repair"])
    assert set(row["bytes_by_phase"]) == {"train", "repair"}
    assert row["aggregation"]["repair"] == "repair" and "repair_skipped" not in row
    assert row["test_accuracy"] > 0.5
