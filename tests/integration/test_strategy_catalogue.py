"""The strategy catalogue through real Flower simulations on Ray (digits, 4 clients, 3 rounds).

- Flower's own ``FedAdam`` in a minimal ServerApp (``Strategy.start``) driving fedalign's ClientApp
  gives the global model ``fedalign run`` gives with ``server_optimizer: adam`` (float tolerance:
  Flower steps in float64, samples the nodes in another order). The other Flower strategies are
  compared without Ray in ``tests/fl/test_flower_strategies.py``.
- SCAFFOLD with FedAdam on the server, and MOON, 3 rounds, stopped after round 2 and resumed in a
  new simulation (whose nodes start with empty ``Context.state``), repeat the uninterrupted run bit
  for bit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from fedalign.config.components import run_federation, run_model
from fedalign.config.load import load_config
from fedalign.fl.client_app import app as client_app
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from fedalign.report.results import read_rows
from fedalign.runs.runner import backend_config, run
from tests.helpers import DIGITS

pytestmark = pytest.mark.integration

ADAM = ["server_optimizer.name=adam", "server_optimizer.lr=0.05", "strategy.fraction_evaluate=0"]


def test_flowers_fedadam_server_app_gives_fedaligns_fedadam_model(tmp_path):
    cfg = load_config(DIGITS, ["name=fedadam", *ADAM])
    ours = load_file(
        str(run(cfg, output_dir=tmp_path, progress=False).run_dir / "model.safetensors")
    )

    initial = run_model(cfg, run_federation(cfg), init_seed=cfg.resolved_seeds.init).state_dict()
    result = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        n = cfg.data.num_clients
        strategy = FedAdam(
            eta=0.05, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
        )
        outcome = strategy.start(
            grid,
            to_arrays(initial),
            num_rounds=cfg.strategy.rounds,
            train_config=config_record(cfg.to_json()),
        )
        result["arrays"] = outcome.arrays

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=cfg.data.num_clients,
        backend_config=backend_config(cfg),
    )
    assert isinstance(result.get("arrays"), ArrayRecord)
    theirs = to_state_dict(result["arrays"])
    assert sorted(theirs) == sorted(ours)  # safetensors files list their keys sorted
    for key in ours:
        torch.testing.assert_close(theirs[key].float(), ours[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max(float((ours[k] - initial[k]).abs().max()) for k in ours) > 0.01


def resumed_and_whole(cfg, tmp_path):
    """The run folders of ``cfg`` stopped after round 2 and resumed in a new simulation, and of
    ``cfg`` without a stop."""
    whole = run(cfg, output_dir=tmp_path / "whole", progress=False).run_dir
    half = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, rounds=2))
    stopped = run(half, output_dir=tmp_path / "stopped", progress=False).run_dir
    run(cfg, resume_dir=stopped, progress=False)
    return stopped, whole


def assert_restored_bitwise(stopped, whole) -> None:
    """The same rows but round 3's bytes down, which carry every client's state once more (one
    model's worth per client: each of the 4 was accepted before the stop), and the same model."""
    keys = ("round", "test_accuracy", "test_loss", "train_loss", "bytes_up")
    got, want = read_rows(stopped), read_rows(whole)
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
    a, b = (
        load_file(str(stopped / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    model_bytes = sum(len(x.data) for x in to_arrays(b).values())  # as Flower serialises it
    assert got[3]["bytes_down"] == want[3]["bytes_down"] + 4 * model_bytes
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_scaffold_with_fedadam_resumes_bitwise_in_a_new_simulation(tmp_path):
    cfg = load_config(
        DIGITS, ["name=scaffold", "strategy.name=scaffold", "strategy.rounds=3", *ADAM]
    )
    stopped, whole = resumed_and_whole(cfg, tmp_path)
    assert_restored_bitwise(stopped, whole)  # the clients' control variates
    assert read_rows(whole)[-1]["test_accuracy"] > 0.8


def test_moon_resumes_bitwise_in_a_new_simulation(tmp_path):
    """MOON's previous local models live in the nodes' ``Context.state`` across Flower's rounds,
    and a resumed simulation, whose nodes start empty, gets them back from the checkpoint (FedDyn
    keeps its state through the same hook and server copy: ``tests/fl/test_feddyn_moon.py``
    resumes both on mock clients)."""
    cfg = load_config(
        DIGITS,
        ["name=moon", "strategy.name=moon", "strategy.rounds=3", "strategy.fraction_evaluate=0"],
    )
    stopped, whole = resumed_and_whole(cfg, tmp_path)
    assert_restored_bitwise(stopped, whole)
    assert read_rows(whole)[-1]["test_accuracy"] > 0.7
