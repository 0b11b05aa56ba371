"""The strategy catalogue through real Flower simulations on Ray (digits, 4 clients, 3 rounds).

- Flower's own ``FedAdam`` in a minimal ServerApp (``Strategy.start``) driving fedalign's ClientApp
  gives the global model ``fedalign run`` gives with ``server_optimizer: adam`` (float tolerance:
  Flower steps in float64, samples the nodes in another order). The other Flower strategies are
  compared without Ray in ``tests/fl/test_flower_strategies.py``.
- SCAFFOLD with FedAdam on the server, 3 rounds, stopped after round 2 and resumed in a new
  simulation (whose nodes start with empty ``Context.state``), repeats the uninterrupted run bit
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


def test_scaffold_with_fedadam_resumes_bitwise_in_a_new_simulation(tmp_path):
    cfg = load_config(
        DIGITS, ["name=scaffold", "strategy.name=scaffold", "strategy.rounds=3", *ADAM]
    )
    whole = run(cfg, output_dir=tmp_path / "whole", progress=False).run_dir
    half = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, rounds=2))
    stopped = run(half, output_dir=tmp_path / "stopped", progress=False).run_dir
    run(cfg, resume_dir=stopped, progress=False)

    keys = ("round", "test_accuracy", "test_loss", "train_loss", "bytes_down", "bytes_up")
    got, want = read_rows(stopped), read_rows(whole)
    assert [{k: r[k] for k in keys if k != "bytes_down"} for r in got] == [
        {k: r[k] for k in keys if k != "bytes_down"} for r in want
    ]
    # round 3 restores each client's control variate from the checkpoint: one model's worth more
    final = load_file(str(whole / "model.safetensors"))
    model_bytes = sum(len(a.data) for a in to_arrays(final).values())  # as Flower serialises it
    assert got[3]["bytes_down"] == want[3]["bytes_down"] + 4 * model_bytes
    a, b = (
        load_file(str(stopped / "model.safetensors")),
        load_file(str(whole / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert want[-1]["test_accuracy"] > 0.8
