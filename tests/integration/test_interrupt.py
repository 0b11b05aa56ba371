"""A real `fedalign run` in a subprocess: its Ray listens on the loopback interface only, and
SIGINT stops it after the current exchange, keeps its checkpoints, says how to resume, exits 130
and leaves no process behind (one Ray start for both checks)."""

from __future__ import annotations

import glob
import signal

import psutil
import pytest

from tests.integration.processes import is_loopback, left_after, listening, run_until_checkpoint

pytestmark = pytest.mark.integration


def test_sigint_stops_a_loopback_only_run_cleanly_keeping_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    settings = ["strategy.rounds=200", "name=stop"]
    with run_until_checkpoint(out, settings, 2, tmp_path / "run.log") as proc:
        run = psutil.Process(proc.pid)
        started = run.children(recursive=True)
        sockets = listening([run, *started])
        assert sockets, "the run's Ray listens somewhere"
        assert {s for s in sockets if not is_loopback(s[1])} == set()
        proc.send_signal(signal.SIGINT)  # as Ctrl-C does, to the run only
        code = proc.wait(timeout=120)
    text = (tmp_path / "run.log").read_text()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    (run_dir,) = out.iterdir()
    assert f"continue with `fedalign run --resume {run_dir}`" in text.splitlines()[-1]
    assert glob.glob(f"{run_dir}/checkpoints/round-*.json")
    assert not (run_dir / "summary.json").exists()
    left = left_after(started, 2)  # ended within 2 s
    assert left == [], [p.name() for p in left]
