"""A real `fedalign run` in a subprocess: its Ray listens on the loopback interface only, and
SIGINT stops it after the current exchange, keeps its checkpoints, says how to resume, exits 130
and leaves no process behind (one Ray start for both checks)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import DIGITS
from tests.integration.processes import alive, is_loopback, listening

pytestmark = pytest.mark.integration


def test_sigint_stops_a_loopback_only_run_cleanly_keeping_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedalign.cli", "run", str(DIGITS), "--output", str(out)]
    cmd += ["--no-progress", "--set", "strategy.rounds=200", "--set", "name=stop"]
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = psutil.Process(proc.pid)
    try:
        deadline = time.time() + 300
        while not glob.glob(f"{out}/*/checkpoints/round-000002.json"):
            assert time.time() < deadline and proc.poll() is None, "no second checkpoint"
            time.sleep(0.05)
        started = run.children(recursive=True)
        sockets = listening([run, *started])
        assert sockets, "the run's Ray listens somewhere"
        assert {s for s in sockets if not is_loopback(s[1])} == set()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C does, to the run only
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = (tmp_path / "run.log").read_text()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    (run_dir,) = out.iterdir()
    assert f"continue with `fedalign run --resume {run_dir}`" in text.splitlines()[-1]
    assert glob.glob(f"{run_dir}/checkpoints/round-*.json")
    assert not (run_dir / "summary.json").exists()
    time.sleep(2)
    left = alive(started)
    assert left == [], [p.name() for p in left]
