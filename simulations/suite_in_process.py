"""A benchmark suite run in this process: the same run folders, metrics and summary as
``fedalign bench SUITE.yaml``, with the Flower messages carried by a direct call instead of Ray.

Each run is ``fedalign.runs.server_app.run_server`` (the round engine, the strategy, evaluation,
checkpoints, metrics) on a grid whose nodes are fedalign's ClientApp called in this process, each
node with its own ``Context`` (partition id, ``Context.state`` kept across rounds, as Flower's
simulation keeps it). Messages, reply checks and byte accounting are the engine's own; what is left
out is Ray's start-up and scheduling, which on a shared 2-core machine cost minutes per run while
the rounds of a digits run take seconds. Used for issue 13's reduced NIID-Bench label-skew study:

    .venv/bin/python simulations/suite_in_process.py configs/bench_niid_reduced.yaml \
        --output docs/results/niid_reduced
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedalign.config.schema import RunConfig
from fedalign.fl.client_app import app as client_app
from fedalign.runs.bench import finished_run, load_suite, summarise_suite
from fedalign.runs.folder import new_run
from fedalign.runs.server_app import run_server


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """The process identity Flower's runtime sets before a ServerApp runs (building a Message
    needs it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


class InProcessGrid:
    """The two methods of Flower's ``Grid`` the engine calls, answered by fedalign's ClientApp in
    this process; node ``1000 + p`` holds partition ``p``."""

    def __init__(self, cfg: RunConfig) -> None:
        n = cfg.data.num_clients
        self.contexts = {
            1000 + p: Context(
                run_id=1,
                node_id=1000 + p,
                node_config={"partition-id": p, "num-partitions": n},
                state=RecordDict(),
                run_config={},
            )
            for p in range(n)
        }
        self.pull_interval = 0.0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            metadata = Metadata(
                run_id=1,
                message_id="",
                src_node_id=node,
                dst_node_id=0,
                reply_to_message_id="",
                group_id="",
                created_at=0.0,
                ttl=timeout or 3600.0,
                message_type=msg.metadata.message_type,
            )
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - a client's failure is an error reply
                replies.append(Message(metadata=metadata, error=Error(code=0, reason=str(exc))))
                continue
            replies.append(Message(metadata=metadata, content=reply.content))
        return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    suite = load_suite(args.suite, args.output, args.set)
    for i, cell in enumerate(suite.runs, 1):
        folder = suite.output / cell.folder
        label = f"[{i}/{len(suite.runs)}] {cell.partition}/{cell.strategy}/seed-{cell.seed}"
        if finished_run(folder) is not None:
            print(f"{label}: finished before, skipped", flush=True)
            continue
        with server_identity():
            summary = run_server(InProcessGrid(cell.cfg), cell.cfg, new_run(cell.cfg, folder))
        print(f"{label}: final accuracy {summary.get('final_accuracy')}", flush=True)
    summarise_suite(suite)
    print(f"summary: {suite.output / 'summary.md'}")


if __name__ == "__main__":
    main()
