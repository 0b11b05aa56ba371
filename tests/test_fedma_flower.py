"""FedMA through a real Flower simulation on Ray (digits MLP)."""

import json
from pathlib import Path

import pytest

from fedalign.config import load_config
from fedalign.results import read_rows
from fedalign.runner import run

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_fedma_rounds_match_layer_by_layer(tmp_path):
    cfg = load_config(ROOT / "configs/digits_mlp.yaml", [
        "name=digits-fedma", "strategy.name=fedma", "strategy.rounds=2", "model.hidden=[32, 32]",
        "data.partition=dirichlet", "data.alpha=0.5", "data.val_fraction=0.0", "train.local_epochs=3",
    ])
    outcome = run(cfg, output_dir=tmp_path, progress=False)
    rows = read_rows(outcome.run_dir)
    for r in rows[1:]:
        assert r["clients_ok"] == 4 and r["clients_failed"] == 0
        assert set(r["bytes_by_phase"]) == {"train", "layer:layers.0", "layer:layers.1"}
        assert r["fedma"]["phases"] == 3
        assert all(w >= 32 for w in r["fedma"]["widths"].values())
        assert r["bytes_down"] == sum(p["down"] for p in r["bytes_by_phase"].values())
    assert rows[2]["test_accuracy"] > 0.7
    # the matching state (each client's assignments) is checkpointed for --resume
    (manifest,) = sorted((outcome.run_dir / "checkpoints").glob("round-000002.json"))
    assignments = json.loads(manifest.read_text())["state"]["assignments"]
    assert sorted(assignments) == ["0", "1", "2", "3"]
    assert len(assignments["0"]["layers.0"]) == 32
