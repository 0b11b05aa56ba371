"""PFNM through a real Flower simulation on Ray (digits)."""

import pytest
from safetensors.torch import load_file

from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.helpers import ROOT

pytestmark = pytest.mark.integration

PFNM = [
    "name=digits-pfnm",
    "strategy.name=pfnm",
    "data.partition=dirichlet",
    "data.alpha=0.5",
    "data.val_fraction=0.0",
    "train.local_epochs=10",
    "model.hidden=[32]",
]


def test_one_shot_pfnm_grows_the_global_model(tmp_path):
    cfg = load_config(
        ROOT / "configs/digits_mlp.yaml",
        PFNM + ["strategy.rounds=1", "strategy.sigma=0.3", "strategy.gamma=5.0"],
    )
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    rows = read_rows(outcome.run_dir)
    fused = rows[1]["pfnm"]
    assert rows[1]["clients_ok"] == 4
    assert fused["widths"][0] > 32  # skewed clients: new global neurons
    assert rows[1]["test_accuracy"] > 0.7
    state = load_file(str(outcome.run_dir / "model.safetensors"))
    assert state["layers.0.weight"].shape == (fused["widths"][0], 64)


def test_pfnm_grid_scored_by_clients_then_fedavg_rounds(tmp_path):
    cfg = load_config(
        ROOT / "configs/digits_mlp.yaml",
        PFNM
        + [
            "strategy.rounds=2",
            "strategy.grid=true",
            "train.local_epochs=2",
            "strategy.grid_tolerance=0.02",
        ],
    )
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    rows = read_rows(outcome.run_dir)
    first, second = rows[1], rows[2]
    assert 0 < first["pfnm"]["client_train_accuracy"] <= 1
    assert first["seconds_score"] > 0
    candidates = first["pfnm"]["candidates"]
    assert len(candidates) == 18
    top = max(c["score"] for c in candidates)
    eligible = [sum(c["widths"]) for c in candidates if c["score"] >= top - 0.02]
    assert sum(first["pfnm"]["widths"]) == min(eligible)  # the smallest model within tolerance
    assert first["pfnm"]["client_train_accuracy"] >= top - 0.02

    def model_bytes(width):  # float32 MLP 64-width-10
        return 4 * (64 * width + width + width * 10 + 10)

    width = first["pfnm"]["widths"][0]
    train_down = 4 * model_bytes(32)
    # 18 candidates, each at least as wide as one client's layer, sent to 4 clients to score
    assert first["bytes_down"] >= train_down + 18 * 4 * model_bytes(32)
    # FedAvg on the grown model (each of the 4 arrays carries a small .npy header)
    assert 4 * model_bytes(width) <= second["bytes_down"] <= 4 * (model_bytes(width) + 4 * 256)
    assert second["test_accuracy"] > 0.5
