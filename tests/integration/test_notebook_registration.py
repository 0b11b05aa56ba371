"""A model registered in ``__main__`` without a file (a notebook cell, a REPL, a script fed to
``python -``) runs on the Ray workers: ``fedalign.core.plugins`` ships it to them pickled by
value (``FEDALIGN_PLUGIN_OBJECTS``) instead of naming a module they cannot import. Before, each
client failed with an ImportError and the round with RoundFailedError, after Ray had started."""

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
outcome = fedalign.run(cfg, output_dir={out!r}, progress=False)
print(json.dumps({{"run_dir": str(outcome.run_dir)}}))
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
    run_dir = Path(json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"])
    assert (run_dir / "summary.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == CLIENTS  # every client built and trained NbMLP
    assert not rows[1].get("failures")
