"""Integration: ``simulation.backend: inprocess`` repeats a Ray run, in a process without Ray.

The Ray run is the shared one of this session (conftest.py); the in-process run is a fresh Python
in which ``import ray`` fails, as on a machine where Ray is not installed. SCAFFOLD with half the
clients a round exercises what the backend must keep as Flower does: the sampling, each node's
``Context.state`` across rounds (its control variate) and the replies' bytes.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fedalign.config.load import load_config
from fedalign.report.results import read_rows
from fedalign.runs.runner import run
from tests.helpers import DIGITS, ROOT

pytestmark = pytest.mark.integration

OVERRIDES = [
    "strategy.name=scaffold",
    "strategy.rounds=3",
    "strategy.fraction_train=0.5",
    "train.local_epochs=1",
    "seed=3",
]
KEYS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients_sampled",
    "clients_ok",
    "bytes_down",
    "bytes_up",
)

WITHOUT_RAY = """
import json, sys
sys.modules["ray"] = None  # import ray fails, as where it is not installed
from fedalign.config.load import load_config
from fedalign.runs.runner import run
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
outcome = run(cfg, output_dir=sys.argv[3], progress=False)
print(json.dumps({"run_dir": str(outcome.run_dir),
                  "ray": sorted(m for m in sys.modules if m.split(".")[0] == "ray")}))
"""


def test_in_process_backend_repeats_the_ray_run_without_ray(tmp_path):
    on_ray = run(load_config(DIGITS, OVERRIDES), output_dir=tmp_path / "ray", progress=False)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(WITHOUT_RAY),
            str(DIGITS),
            json.dumps([*OVERRIDES, "simulation.backend=inprocess"]),
            str(tmp_path / "inprocess"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ray"] == ["ray"]  # only the blocked name: nothing below it was imported
    ray_rows, own_rows = read_rows(on_ray.run_dir), read_rows(result["run_dir"])
    assert [{k: r[k] for k in KEYS} for r in own_rows] == [
        {k: r[k] for k in KEYS} for r in ray_rows
    ]
    assert ray_rows[-1]["test_accuracy"] > ray_rows[0]["test_accuracy"]  # it trained
    ray_model = load_file(on_ray.run_dir / "model.safetensors")
    own_model = load_file(f"{result['run_dir']}/model.safetensors")
    assert ray_model.keys() == own_model.keys()
    assert all(torch.equal(ray_model[k], own_model[k]) for k in ray_model)
