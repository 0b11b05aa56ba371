"""Signal handling of a run, in-process: the first SIGINT/SIGTERM only asks the run to stop (the
engine reads it after each exchange), the handlers are restored afterwards, and the CLI turns an
interrupted run into one line and exit 130/143."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from fedalign.cli import main
from fedalign.core.errors import RunInterrupted
from fedalign.runs import runner
from fedalign.runs.interrupts import stop_on_signals
from fedalign.runs.reaper import descendants, wait_or_kill, watch
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


def _ended(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_the_watchdog_kills_what_a_killed_run_left_and_nothing_when_stood_down():
    """``fedalign.runs.reaper.watch`` on a shell (the run) and its ``sleep`` (Ray's processes):
    the shell's SIGKILL orphans the sleep, which the watchdog kills; stood down, it kills
    nothing."""
    for stand_down in (b"\n", b""):
        run = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
        read, write = os.pipe()
        watchdog = threading.Thread(target=watch, args=(run.pid, read, 0.05))
        watchdog.start()
        deadline = time.monotonic() + 10
        while not (children := psutil.Process(run.pid).children()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (sleep,) = children
        time.sleep(0.5)  # a few looks (0.05 s apart; more on a loaded machine)
        run.kill()
        time.sleep(0.2)  # more, while the shell is a zombie and the sleep no longer its child
        os.write(write, stand_down)
        os.close(write)
        watchdog.join(timeout=10)
        os.close(read)
        run.wait()
        assert not watchdog.is_alive()
        deadline = time.monotonic() + 5  # a SIGKILL lands asynchronously
        while stand_down == b"" and not _ended(sleep) and time.monotonic() < deadline:
            time.sleep(0.02)
        ended = _ended(sleep)
        assert ended == (stand_down == b"")
        if not ended:
            sleep.kill()


def test_a_run_that_started_ray_returns_with_what_it_started_ended():
    """``reaper.wait_or_kill`` on what started since a snapshot (``descendants()``, taken as
    ``ray_started_early`` takes Ray's processes before stopping Ray): a shell and its ``sleep``
    are ended, the sleep also once the shell is gone and it is an orphan; a process that
    existed before the snapshot (the watchdog, or the caller's own) is left alone."""
    older = subprocess.Popen(["sleep", "60"])
    try:
        before = descendants()
        newer = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
        deadline = time.monotonic() + 10
        while not psutil.Process(newer.pid).children():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = descendants() - before
        (grandchild,) = psutil.Process(newer.pid).children()
        assert started == {psutil.Process(newer.pid), grandchild}
        newer.kill()  # as Ray's shutdown kills the raylet: the sleep is an orphan now
        newer.wait()
        assert grandchild not in descendants()
        wait_or_kill(started, timeout=0.2)
        assert _ended(grandchild)
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()
