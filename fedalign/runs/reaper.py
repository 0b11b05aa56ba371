"""A watchdog that ends a local run's Ray processes when the run's own process dies without
stopping them (SIGKILL, the OOM killer).

Ray's GCS and raylet die with the process that started them (Linux's parent-death signal), but the
raylet's dashboard and runtime-env agents first try to tell the dead GCS that the raylet died and
linger for a minute or more (a 60 s timeout), and client workers take seconds. ``fate_sharing``
starts this module as a small process beside the run (``python -m fedalign.runs.reaper PID``): it
notes the run's descendants every second and, when the run dies (its end of a pipe closes), kills
the ones still alive. A run that ends by itself stands it down first (one byte down the pipe):
stopping Ray is then Flower's business, and in the tests a Ray shared between runs outlives each.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil

INTERVAL = 1.0  # seconds between looks at the run's processes
STAND_DOWN = b"\n"


@contextlib.contextmanager
def fate_sharing(enabled: bool = True) -> Iterator[None]:
    """Within the block, the processes this one starts die with it, even by SIGKILL (when
    ``enabled``: a run on a Ray of its own)."""
    if not enabled:
        yield
        return
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "fedalign.runs.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # it died already (a second Ctrl-C kills the group)
            watchdog.stdin.write(STAND_DOWN)
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()


def descendants() -> set[psutil.Process]:
    """This process's descendants now (a ``Process`` is its pid and start time)."""
    return set(psutil.Process().children(recursive=True))


def wait_or_kill(processes: set[psutil.Process], timeout: float = 5.0) -> None:
    """Wait up to ``timeout`` seconds for ``processes`` to end, then kill those left and wait as
    long again. After ``ray.shutdown()`` a Ray's client workers exit by themselves once they see
    their raylet gone, which takes seconds on a loaded machine; they are orphans by then (no
    longer this process's descendants), so take them from ``descendants()`` before the shutdown.
    A zombie has ended (its new parent reaps it when it gets to it)."""
    alive = _until_ended(processes, timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):  # ended since; psutil checks pid reuse
            process.kill()
    _until_ended(alive, timeout)


def _until_ended(processes: set[psutil.Process], timeout: float) -> set[psutil.Process]:
    """Those of ``processes`` still running after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p for p in processes if not _ended(p)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone (or its pid reused: psutil checks the start time)
        return True


def watch(parent_pid: int, pipe: int, interval: float = INTERVAL) -> None:
    """Note ``parent_pid``'s descendants every ``interval`` seconds until the file descriptor
    ``pipe`` says how the parent ended: a byte (it stands us down) or end of file (it died: kill
    what it left).

    Every process ever seen is kept: a look just after the parent's death (a zombie until its
    own parent waits) no longer finds the orphans, which Linux gave to another parent."""
    me = os.getpid()
    try:
        parent = psutil.Process(parent_pid)
    except psutil.Error:
        return
    known: set[psutil.Process] = set()  # a Process is its pid and start time
    while True:
        with contextlib.suppress(psutil.Error):  # it died
            known.update(p for p in parent.children(recursive=True) if p.pid != me)
        ready, _, _ = select.select([pipe], [], [], interval)
        if ready:
            if os.read(pipe, 1):
                return
            break
    for process in known:
        with contextlib.suppress(psutil.Error):  # ended already; psutil checks pid reuse
            process.kill()


if __name__ == "__main__":
    # Ctrl-C and a SIGTERM to the whole group are the run's to handle; this process ends only
    # when the run stands it down or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.stdin.fileno())
