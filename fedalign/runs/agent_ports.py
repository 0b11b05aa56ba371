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
#: Above the worker ports ``ray start`` uses by default (10002-19999).
LOWEST_PORT = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 32


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out by itself (``connect``, ``bind`` to port 0)."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE.read_text().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default range
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def runtime_env_agent_port() -> int | None:
    """A loopback port free now that nothing should take before the agent binds it, or None.

    Chosen at random outside the kernel's ephemeral range (below it, else above it): while Ray
    starts, its own processes open connections whose ports the kernel draws from that range,
    and a port taken before the agent binds it makes the agent fail and take the raylet down
    with it. None where no port outside the range is free: the agent then picks its own and
    the raylet waits for it, as without ``lean_ray``."""
    low, high = _ephemeral_range()
    candidates = [*range(LOWEST_PORT, low), *range(max(high + 1, LOWEST_PORT), 65536)]
    for port in random.sample(candidates, min(TRIES, len(candidates))):
        if _bindable(port):
            return port
    return None


def write_agent_ports(session_dir: str, node_id: str, runtime_env_port: int | None) -> None:
    """Write the port files with the values the agents will write themselves: the node agent's
    three -1s, and the runtime environment agent's port when it was chosen in advance."""
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
    if runtime_env_port:
        persist_port(session_dir, node_id, RUNTIME_ENV_AGENT_PORT_NAME, runtime_env_port)
