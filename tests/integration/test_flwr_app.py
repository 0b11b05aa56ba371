"""Integration: the ServerApp that ``flwr run .`` starts (``fedalign.runs.server_app.app``), run
in-process on Flower's simulation engine over the shared Ray.

A real ``flwr run .`` starts a SuperLink, builds and installs the app into ``FLWR_HOME`` and starts
its own Ray: a minute or more per run on our two cores, too slow for the suite (it was checked by
hand; see the README). What ``flwr run`` adds before our code runs is the run config (the
``[tool.flwr.app.config]`` table, fused with ``-c``) in ``context.run_config``; this test hands the
module-level ``main`` exactly such a context, so everything after it is the ``flwr run`` path.
"""

from __future__ import annotations

import re

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedalign.config.load import load_config
from fedalign.fl.client_app import app as client_app
from fedalign.report.results import read_rows
from fedalign.runs import server_app
from fedalign.runs.runner import backend_config
from tests.helpers import DIGITS

pytestmark = pytest.mark.integration


def run_as_flwr_run(run_config: dict, num_supernodes: int) -> None:
    """Simulate ``flwr run .`` with ``run_config`` and a federation of ``num_supernodes``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_app.main(
            grid,
            Context(
                run_id=context.run_id,
                node_id=0,
                node_config={},
                state=RecordDict(),
                run_config=run_config,
            ),
        )

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=backend_config(load_config(DIGITS)),
    )


def test_the_flwr_run_server_app_maps_flower_keys_and_prints_one_line_per_round(tmp_path, capfd):
    run_as_flwr_run(
        {
            "config": str(DIGITS),
            "num-server-rounds": 2,
            "overrides": "model.hidden=[32,16],data.partition=iid",
            "output-dir": str(tmp_path),
        },
        num_supernodes=4,
    )
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"round \d+/2", line)]
    assert [line.split(":")[0] for line in lines] == [
        "round 0/2 (initial model)",
        "round 1/2",
        "round 2/2",
    ]
    assert "clients 4 ok 0 failed" in lines[-1]
    (run_dir,) = tmp_path.iterdir()
    rows = read_rows(run_dir)
    assert f"test acc {100 * rows[-1]['test_accuracy']:.2f}%" in lines[-1]
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.strategy.rounds == 2 and cfg.model.options["hidden"] == [32, 16]


def test_num_supernodes_other_than_num_clients_is_one_line_and_no_run(tmp_path, capfd):
    run_as_flwr_run({"config": str(DIGITS), "output-dir": str(tmp_path)}, num_supernodes=3)
    err = capfd.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("fedalign:")]
    assert line == (
        "fedalign: config error: the federation has num-supernodes=3 but data.num_clients=4: "
        "pass --federation-config 'num-supernodes=4' "
        "(or -c \"overrides='data.num_clients=3'\")"
    )
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # stopped before the run folder
