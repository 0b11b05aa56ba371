"""Ctrl-C and SIGTERM during a run: stop cleanly after the current exchange, or at once.

The first SIGINT or SIGTERM sets a flag the round engine reads after every exchange with the
clients: the run stops there (``RunInterrupted``), Flower shuts its actors and Ray down, every
finished checkpoint stays, and the CLI prints how to resume and exits 130 (SIGINT) or 143
(SIGTERM). A second signal stops at once: the processes this run started (Ray's) are killed and
the process exits with the same code. Ray's driver would otherwise replace the SIGTERM handler with
its own ``sys.exit``, and its core worker would answer SIGTERM with a stack dump and abort the
process 3 s later (exit 134); both are switched off for the run (``keep_sigterm_handler``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psutil

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Whether (and by which signal) the user asked the run to stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None
        self.started: list[psutil.Process] = []  # this run's processes when the signal came

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int) -> None:
        self.signal = signum
        self.started = psutil.Process().children(recursive=True)
        self._event.set()

    def reap(self, grace: float = 1.0) -> None:
        """Kill what is left of the processes running when the signal came: Ray's workers outlive
        its shutdown by seconds and its dashboard and runtime-env agents by a minute (they report
        the raylet's end to the stopped GCS), orphaned (no longer this process's descendants)."""
        _, alive = psutil.wait_procs(self.started, timeout=grace)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


def resume_advice(run_dir: Path, resumable: bool) -> str:
    """What to do with a stopped run's folder."""
    if resumable:
        return f"continue with `fedalign run --resume {run_dir}`"
    return f"no round finished with a checkpoint in {run_dir}: start the run afresh"


def kill_descendants() -> None:
    """SIGKILL every process this one started (Ray's GCS, raylet and workers on a local run)."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def stop_on_signals(run_dir: Path, resumable: Callable, ray: bool = True) -> Iterator[StopRequest]:
    """SIGINT/SIGTERM handlers for the duration of a run (main thread only; elsewhere the request
    is never set). ``resumable()`` says whether a checkpoint exists when a second signal comes;
    ``ray``: whether the run starts Ray (an in-process run neither needs nor imports it)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if request():
            print(
                f"fedalign: {name} again: stopped at once; {resume_advice(run_dir, resumable())}",
                file=sys.stderr,
                flush=True,
            )
            kill_descendants()
            os._exit(EXIT_CODES.get(signum, 1))
        request.set(signum)
        print(
            f"fedalign: {name}: stopping after the current exchange with the clients "
            f"({name} again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handle) for sig in EXIT_CODES}
    with keep_sigterm_handler() if ray else contextlib.nullcontext():
        try:
            yield request
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if request():
                request.reap()


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Within the block, Ray's driver leaves SIGTERM to the handler it finds.

    Two parts of ``ray.init`` take it: ``set_sigterm_handler`` (a ``sys.exit``), and the core
    worker's C++ failure signal handler (absl's), which on SIGTERM prints a stack dump, passes the
    signal on to Python's handler and arms a 3-second alarm that aborts the process if it is still
    alive then, as it is while the run stops cleanly: exit 134 and no resume advice. The driver
    starts without it (``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``, read when its core worker starts);
    Ray's other processes keep theirs.
    """
    import ray._private.utils as ray_utils  # here: the CLI's other commands never import Ray
    from ray._private import ray_constants

    originals = ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    ray_utils.set_sigterm_handler = lambda handler: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = originals


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its output is flushed, without the interpreter's
    teardown: after a stopped run, collecting torch's, Ray's and Flower's modules takes seconds
    (8 s on a loaded machine), which a SIGTERM's sender (Slurm, Docker, systemd) may not wait."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
