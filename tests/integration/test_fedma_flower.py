"""FedMA through a real Flower simulation on Ray (digits MLP, fortunes char-LSTM)."""

import json

import pytest
from safetensors.torch import load_file

from fedalign.config.load import load_config
from fedalign.data.text import FORTUNES_DIR
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_fedma_rounds_match_layer_by_layer(tmp_path):
    cfg = load_config(
        ROOT / "configs/digits_mlp.yaml",
        [
            "name=digits-fedma",
            "strategy.name=fedma",
            "strategy.rounds=2",
            "model.hidden=[32, 32]",
            "data.partition=dirichlet",
            "data.alpha=0.5",
            "data.val_fraction=0.0",
            "train.local_epochs=3",
        ],
    )
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


@pytest.mark.skipif(
    not FORTUNES_DIR.is_dir(), reason=f"Debian's fortunes corpus is not in {FORTUNES_DIR}"
)
def test_fedma_matches_char_lstm_embedding_then_hidden_units(tmp_path):
    """FedMA on the char-LSTM through Flower, on the first fortunes of three real categories (the
    whole corpus takes minutes a round on 2 cores)."""
    corpus = tmp_path / "fortunes"
    corpus.mkdir()
    for category in ("art", "food", "science"):
        fortunes = (FORTUNES_DIR / category).read_text(errors="replace").split("\n%\n")
        (corpus / category).write_text("\n%\n".join(fortunes[:60]) + "\n%\n")
    cfg = load_config(
        ROOT / "configs/fortunes_char_lstm.yaml",
        [
            "name=fortunes-fedma",
            "strategy.name=fedma",
            "strategy.rounds=2",
            f"data.data_dir={corpus}",
            "data.num_clients=3",
            "data.val_fraction=0.0",
            "model.embed_dim=4",
            "model.hidden=16",
            "train.local_epochs=1",
            f"output.dir={tmp_path / 'runs'}",
        ],
    )
    outcome = run(cfg, output_dir=tmp_path / "runs", progress=False)
    rows = read_rows(outcome.run_dir)
    for r in rows[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert set(r["bytes_by_phase"]) == {"train", "layer:embedding", "layer:lstm"}
        widths = r["fedma"]["widths"]
        assert widths["embedding"] >= 4 and widths["lstm"] >= 16
    state = load_file(str(outcome.run_dir / "model.safetensors"))
    hidden = rows[-1]["fedma"]["widths"]["lstm"]
    assert state["lstm.weight_hh_l0"].shape == (4 * hidden, hidden)
    assert state["lstm.weight_ih_l0"].shape == (
        4 * hidden,
        rows[-1]["fedma"]["widths"]["embedding"],
    )
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
