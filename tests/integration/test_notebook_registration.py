"""A model registered in ``__main__`` without a file (a notebook cell, a REPL, a script fed to
``python -``) runs on the Ray workers: ``fedalign.core.plugins`` ships it to them pickled by
value (``FEDALIGN_PLUGIN_OBJECTS``) instead of naming a module they cannot import. Before, each
client failed with an ImportError and the round with RoundFailedError, after Ray had started.

The script is a fresh process, so its run starts a Ray of its own the way every ``fedalign
run`` does (``runner.ray_started_early``): Ray and a warm actor pool start while the run writes
its folder, the shipped model reaches those early workers, Flower takes that pool instead of
building one, and nothing is left running after the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import DIGITS, ROOT

pytestmark = pytest.mark.integration

SCRIPT = """
import json
import sys

sys.path.insert(0, {root!r})  # the repository, as a notebook started elsewhere would add it
import torch

import fedalign


class NbMLP(torch.nn.Module):
    \"\"\"Defined in __main__, which has no file: no worker could import it.\"\"\"

    def __init__(self, in_features=64, num_classes=10, hidden=(16,)):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden[0])
        self.fc2 = torch.nn.Linear(hidden[0], num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


fedalign.register_model("nb-mlp", NbMLP)
cfg = fedalign.load_config({config!r}, {overrides!r})

import psutil
import ray
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

import fedalign.runs.runner as runner

flower_built = []  # pools Flower builds itself: none when one started with Ray
build = RayBackend.build
def noting_build(backend, app_fn):
    build(backend, app_fn)
    flower_built.append(backend.pool)
RayBackend.build = noting_build
early = []  # this process's children when the run goes on to write its folder
run_rest = runner._run
def watching(*args, **kwargs):
    early.extend(psutil.Process().children(recursive=True))
    return run_rest(*args, **kwargs)
runner._run = watching

outcome = fedalign.run(cfg, output_dir={out!r}, progress=False)
print(json.dumps({{
    "run_dir": str(outcome.run_dir),
    "early": len(early),
    "flower_built": len(flower_built),
    "build_restored": RayBackend.build is noting_build,
    "ray_up_after": ray.is_initialized(),
    "left": [p.name() for p in early if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
}}))
"""

CLIENTS = 2
_FEDALIGN_VARS = ("FEDALIGN_PLUGINS", "FEDALIGN_PLUGIN_OBJECTS")
"""Left by an earlier run of this test process (``fedalign.run`` exports them): not the script's."""


def test_a_model_defined_in_a_script_read_from_stdin_runs_on_the_ray_workers(tmp_path):
    out = tmp_path / "runs"
    overrides = [
        "name=notebook",
        "model.name=nb-mlp",
        "model.hidden=[16]",
        f"data.num_clients={CLIENTS}",
        "train.local_epochs=1",
        "strategy.rounds=1",
        "output.plot=false",
        "output.checkpoint_every=0",
    ]
    script = SCRIPT.format(root=str(ROOT), config=str(DIGITS), overrides=overrides, out=str(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and k not in _FEDALIGN_VARS}
    proc = subprocess.run(
        [sys.executable, "-"],
        input=textwrap.dedent(script),
        cwd=tmp_path,  # not the repository: nothing of the test is importable by a worker
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(result["run_dir"])
    assert (run_dir / "summary.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == CLIENTS  # every client built and trained NbMLP
    assert not rows[1].get("failures")
    assert result["early"] > 0  # Ray's processes, started before the run's folder
    assert result["flower_built"] == 0  # Flower took the pool started with Ray
    assert result["build_restored"]  # and its build is its own again after the run
    assert not result["ray_up_after"]
    assert result["left"] == []
