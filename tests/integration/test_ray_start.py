"""A run on a Ray of its own starts Ray and a warm actor pool while it writes its folder
(``runner.ray_started_early``), hands that pool to Flower, and leaves nothing running after."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import DIGITS, ROOT

pytestmark = pytest.mark.integration

# A fresh driver (the test session's shared Ray would take the run's place), two rounds.
DRIVER = f"""
import json, sys
import psutil
import ray
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
import fedalign.runs.runner as runner
from fedalign.config.load import load_config

build = RayBackend.build
pools = []
def noting_build(backend, app_fn):  # Flower's own pool: not wanted when one started with Ray
    build(backend, app_fn)
    pools.append(backend.pool)
RayBackend.build = noting_build
cfg = load_config({str(DIGITS)!r}, ["strategy.rounds=2", "output.checkpoint_every=0"])
seen = []
original = runner._run
def watching(*args, **kwargs):
    seen.extend(psutil.Process().children(recursive=True))  # Ray, started before the folder
    return original(*args, **kwargs)
runner._run = watching
outcome = runner.run(cfg, output_dir=sys.argv[1], progress=False)
print(json.dumps({{
    "accuracy": outcome.summary["final_accuracy"],
    "flower_built": len(pools),
    "build_restored": RayBackend.build is noting_build,
    "ray_up_after": ray.is_initialized(),
    "started_before_folder": len(seen),
    "left": [p.name() for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
}}))
"""


def test_a_run_starts_ray_and_its_actors_early_and_stops_them(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] > 0.5
    assert result["started_before_folder"] > 0  # Ray's processes, before the run's folder
    assert result["flower_built"] == 0  # Flower took the pool started with Ray
    assert result["build_restored"]  # and its build is its own again after the run
    assert not result["ray_up_after"]
    assert result["left"] == []
