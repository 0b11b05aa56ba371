"""A ``fedalign run`` in a subprocess, and what it leaves on the machine: its listening sockets
and its processes."""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.helpers import DIGITS


@contextlib.contextmanager
def run_until_checkpoint(
    out: Path, settings: list[str], checkpoint: int, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """``fedalign run`` of the digits config with ``settings`` into ``out``, in a session of its
    own (a signal sent to it reaches the run only), its output in ``log``; yielded once its
    checkpoint of round ``checkpoint`` is written (within 300 s), killed with its process group
    if the block leaves it running."""
    cmd = [sys.executable, "-m", "fedalign.cli", "run", str(DIGITS), "--output", str(out)]
    cmd += ["--no-progress", *(arg for setting in settings for arg in ("--set", setting))]
    with open(log, "w") as output:
        proc = subprocess.Popen(
            cmd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.time() + 300
        while not glob.glob(f"{out}/*/checkpoints/round-{checkpoint:06d}.json"):
            assert time.time() < deadline and proc.poll() is None, f"no checkpoint {checkpoint}"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def listening(processes: list[psutil.Process]) -> set[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of ``processes``."""
    found = set()
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip))
        except psutil.Error:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (
        ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback
    )


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (zombies count as ended)."""
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.Error:
            continue
    return left


def left_after(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after waiting up to ``seconds`` for them to end."""
    deadline = time.monotonic() + seconds
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
