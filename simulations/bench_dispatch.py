r"""The simulation engine's dispatch scan at 1,000 and 10,000 nodes (issue 17): one pass of Flower's
``vce_api.add_messages_to_queue`` loop body (``get_message_ins(node, limit=1)`` for every node,
then it sleeps 0.1 s) against one ``fedalign.fl.dispatch.take_pending``, on Flower's real in-memory
link state with N registered nodes and M messages in flight (a cohort, or the info query's N).
No Ray: this is the driver-side cost that every 0.1 s of a simulation pays.

    .venv/bin/python simulations/bench_dispatch.py --out docs/results/bench_dispatch.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from fedalign.fl.dispatch import take_pending
from fedalign.runs.studies import write_json


def link_state(nodes: int, messages: int) -> tuple[InMemoryLinkState, dict[int, int]]:
    """An in-memory link state as ``run_simulation`` builds it, ``nodes`` registered, and
    ``messages`` small messages stored for the first nodes (undelivered)."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    mapping = _register_nodes(nodes, factory)
    # the identity Flower's runtime gives a ServerApp thread (building a Message needs it)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    for node in list(mapping)[:messages]:
        msg = Message(RecordDict(), dst_node_id=node, message_type="query.info")
        msg.metadata.__dict__["_run_id"] = run.run_id
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        if state.store_message_ins(msg) is None:
            raise SystemExit("the link state refused the message")
    return state, mapping


def flower_scan(state: InMemoryLinkState, mapping: dict[int, int]) -> int:
    """One pass of Flower's loop body; the number of messages it took."""
    return sum(len(state.get_message_ins(node_id=node, limit=1)) for node in mapping)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["1000:50", "1000:1000", "10000:100"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        nodes, messages = map(int, case.split(":"))
        row = {"nodes": nodes, "messages_in_flight": messages}
        for name, scan in (("flower", flower_scan), ("fast", take_pending)):
            state, mapping = link_state(nodes, messages)
            t0 = time.perf_counter()
            taken = scan(state, mapping)
            row[f"{name}_scan_s"] = round(time.perf_counter() - t0, 6)
            row[f"{name}_taken"] = taken if isinstance(taken, int) else len(taken)
            # a scan with the messages delivered (what every later 0.1 s pays until the replies)
            t0 = time.perf_counter()
            scan(state, mapping)
            row[f"{name}_idle_scan_s"] = round(time.perf_counter() - t0, 6)
        if row["flower_taken"] != row["fast_taken"]:
            raise SystemExit(f"{case}: the two scans took different numbers of messages")
        row["speedup"] = round(row["flower_scan_s"] / max(row["fast_scan_s"], 1e-6), 1)
        row["load_average"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_json(args.out, {"cores": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
