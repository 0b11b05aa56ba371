"""Integration: two Flower rounds on each hub dataset (tiny copies with the hub's schemas), run
from the paper-setting configs with only reduced-scale overrides and the copy's folder."""

import json

import pytest

from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.data import hub_copies
from tests.helpers import CONFIGS

pytestmark = pytest.mark.integration

SMALL = ["strategy.rounds=2", "train.local_epochs=1", "simulation.client_gpus=0"]
CASES = {
    "cifar10": ("cifar10_lenet_fedavg.yaml", ["data.num_clients=3"], 10),
    "femnist": (
        "femnist_lenet_fedavg.yaml",
        ["data.num_clients=3", "strategy.fraction_train=1.0"],
        62,
    ),
    "shakespeare": (
        "shakespeare_char_lstm_fedma.yaml",
        ["data.num_clients=3", "strategy.name=fedavg", "model.hidden=16"],
        80,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_rounds_on_each_hub_dataset(tmp_path, name):
    hub_copies.write(name, tmp_path / "data")
    config, overrides, classes = CASES[name]
    cfg = load_config(CONFIGS / config, [*SMALL, *overrides, f"data.data_dir={tmp_path / 'data'}"])
    outcome = run(cfg, output_dir=tmp_path / "runs", progress=False)
    rows = read_rows(outcome.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    partition = json.loads((outcome.run_dir / "partition.json").read_text())
    assert partition["dataset"] == name and partition["num_classes"] == classes
    assert len(partition["label_histogram"]) == 3
