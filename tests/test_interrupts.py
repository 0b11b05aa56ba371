"""Signal handling of a run, in-process: the first SIGINT/SIGTERM only asks the run to stop (the
engine reads it after each exchange), the handlers are restored afterwards, and the CLI turns an
interrupted run into one line and exit 130/143."""

from __future__ import annotations

import os
import signal

import pytest

from fedalign.cli import main
from fedalign.core.errors import RunInterrupted
from fedalign.runs import runner
from fedalign.runs.interrupts import stop_on_signals
from tests.helpers import DIGITS


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_the_run_to_stop_and_handlers_are_restored(tmp_path, signum, capsys):
    before = signal.getsignal(signum)
    with stop_on_signals(tmp_path, lambda: True) as stop:
        assert not stop()
        os.kill(os.getpid(), signum)
        assert stop() and stop.signal == signum
    assert signal.getsignal(signum) == before
    assert "stopping after the current exchange" in capsys.readouterr().err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_is_one_line_and_its_signal_exit_code(
    tmp_path, monkeypatch, capsys, signum, code
):
    def interrupted(*args, **kwargs):
        exc = RunInterrupted("stopped on request in round 3")
        exc.run_dir, exc.resumable, exc.signal = tmp_path, True, signum
        raise exc

    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["run", str(DIGITS), "--no-progress"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedalign: stopped on request in round 3; continue with `fedalign run --resume {tmp_path}`"
    ]
