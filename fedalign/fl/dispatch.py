"""Message dispatch in Flower's simulation engine, made proportional to the messages in flight.

Flower hands server messages to the Ray actors from one thread (``vce_api.add_messages_to_queue``)
that asks the link state, node by node, for that node's next message, then sleeps 0.1 s. The
in-memory link state answers each question by walking every stored message (and re-checking each
one's expiry and federation), so one scan costs ``nodes x messages in flight`` checks: with 1,000
nodes and a cohort of 50 that is 50,000 checks every 0.1 s in the driver, and the info query that
maps nodes to partitions (1,000 messages at once) costs 10^6 a scan; at 10,000 nodes, 10^8.

``fast_dispatch`` replaces that loop, for the duration of one simulation, by one that walks the
stored messages once per scan (the same checks, the same one message per node per scan, marked
delivered the same way) and polls every ``POLL_SECONDS``. It also keeps the node-to-partition
mapping the engine registers, so the server can map nodes to partitions without the info query
(``registered_partitions``). It is applied only to the Flower versions it was checked against
(``SUPPORTED``) and only over the in-memory link state; otherwise Flower's own loop runs. Which
actor serves which message does not change results: every client's work is seeded by its
partition.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from queue import Queue
from typing import Any

import flwr

log = logging.getLogger("fedalign")

SUPPORTED = ("1.41.", "1.42.")
POLL_SECONDS = 0.005

_lock = threading.Lock()
_partitions: dict[int, int] | None = None


def supported(version: str = flwr.__version__) -> bool:
    """Whether this Flower's simulation engine is one the replacement was checked against."""
    return version.startswith(SUPPORTED)


def registered_partitions() -> dict[int, int] | None:
    """Node id -> partition id of the simulation running in this process under
    ``fast_dispatch`` (None otherwise: ask the nodes)."""
    with _lock:
        return None if _partitions is None else dict(_partitions)


def take_pending(state: Any, nodes: dict[int, int]) -> list[Any]:
    """The undelivered messages of the in-memory link ``state``, at most one per node of
    ``nodes`` (as Flower's ``get_message_ins(node_id, limit=1)`` gives), in the order they were
    stored, marked delivered; expired messages are dropped by the state's own check."""
    from flwr.supercore.date import now

    taken: dict[int, Any] = {}
    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node in nodes and node not in taken:
                taken[node] = msg
        delivered_at = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = delivered_at
    return list(taken.values())


def _add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue``: one walk over the stored messages a scan."""
    while not f_stop.is_set():
        for msg in take_pending(state, nodes_mapping):
            queue.put(msg)
        f_stop.wait(POLL_SECONDS)


@contextlib.contextmanager
def fast_dispatch(enabled: bool = True) -> Iterator[bool]:
    """Within the block, simulations in this process dispatch with ``take_pending`` and record
    their node-to-partition mapping; yields whether the replacement is active."""
    global _partitions
    if not enabled:
        yield False
        return
    if not supported():
        log.info(
            "Flower %s: its own message dispatch runs (fast_dispatch checked on %s)",
            flwr.__version__,
            ", ".join(v + "x" for v in SUPPORTED),
        )
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState

    original_loop, original_register = vce_api.add_messages_to_queue, vce_api._register_nodes

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        if not isinstance(state, InMemoryLinkState):
            return original_loop(state, queue, nodes_mapping, f_stop)
        return _add_messages_to_queue(state, queue, nodes_mapping, f_stop)

    def register_nodes(num_nodes, state_factory):
        global _partitions
        mapping = original_register(num_nodes, state_factory)
        with _lock:
            _partitions = dict(mapping)
        return mapping

    vce_api.add_messages_to_queue, vce_api._register_nodes = add_messages_to_queue, register_nodes
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue, vce_api._register_nodes = original_loop, original_register
        with _lock:
            _partitions = None
