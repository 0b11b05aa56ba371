"""The ports a local Ray's raylet waits for before it starts any worker, known in advance.

Ray 2.55's raylet registers its node, and so starts its first workers, only once its two agents
have written their ports into the session folder, after importing Ray and aiohttp: 0.7-1.1 s of
every start on two cores (docs/benchmarks.md, issue 27). A local run without the dashboard knows
what they will write: the minimal node agent runs no metrics, metrics-export or HTTP server and
writes -1 for each, and the runtime environment agent binds the port it is given. So the run picks
that port and writes all four files before the raylet starts (``runner.lean_ray``).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"  # a local run's Ray listens here only (runner.loopback_ray)
#: Above Ray's worker ports (10002-19999 by default), below the kernel's ephemeral range.
LOWEST_PORT = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 32


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out by itself (``connect``, ``bind`` to port 0)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts there


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def runtime_env_agent_port() -> int:
    """A loopback port free now that nothing should take before the agent binds it.

    Chosen at random below the kernel's ephemeral range: a port the kernel picked (``bind`` to
    port 0) goes back into that range when the probe closes, and while Ray starts its own
    processes open connections that draw from it; taken there, the agent would fail to bind and
    take the raylet down with it. Where no such range is left, the kernel's choice."""
    candidates = range(LOWEST_PORT, _ephemeral_floor())
    for port in random.sample(candidates, min(TRIES, len(candidates))):
        if _bindable(port):
            return port
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def write_agent_ports(session_dir: str, node_id: str, runtime_env_port: int) -> None:
    """Write the four port files with the values the agents will write themselves."""
    from ray._raylet import (
        DASHBOARD_AGENT_LISTEN_PORT_NAME,
        METRICS_AGENT_PORT_NAME,
        METRICS_EXPORT_PORT_NAME,
        RUNTIME_ENV_AGENT_PORT_NAME,
        persist_port,
    )

    unused = (METRICS_AGENT_PORT_NAME, METRICS_EXPORT_PORT_NAME, DASHBOARD_AGENT_LISTEN_PORT_NAME)
    for name in unused:
        persist_port(session_dir, node_id, name, -1)
    persist_port(session_dir, node_id, RUNTIME_ENV_AGENT_PORT_NAME, runtime_env_port)
