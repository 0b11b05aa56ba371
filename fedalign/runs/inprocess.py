"""``simulation.backend: inprocess``: a ServerApp and a ClientApp run in this process, without Ray.

Flower 1.42's ``run_simulation`` has one backend, Ray (``vce_api.start_vce`` always builds a
``RayBackend``, which imports Ray), so this module drives the two apps itself with Flower's own
objects, the way its simulation runtime does (``flwr.simulation.run_simulation._main_loop`` and
``vce_api.worker``): an in-memory link state holding the run and one registered node per client,
each node's ``Context`` (partition id, number of partitions, ``Context.state`` kept across
rounds) from Flower's node info stores, and Flower's ``InMemoryGrid`` for the ServerApp. The one
difference is who answers a message: ``InProcessGrid.push_messages`` stores the messages in the
link state and then runs the ClientApp on each, in this thread, storing its reply (or its
exception as an error reply, worded as on Ray) in the link state, where the grid's
``send_and_receive`` pulls it at once. Messages, their metadata and TTLs, the reply checks and the
byte accounting are therefore Flower's and the engine's, unchanged; left out are Ray's start-up,
its worker processes and its scheduling. Clients run one after another, each with
``simulation.client_cpus`` torch threads as on a Ray actor; the server keeps its own thread count
between exchanges. Nothing here imports Ray.

It serves notebooks, unit-sized studies, machines where Ray cannot be installed and one GPU
without Ray; Ray stays the default for simulations at scale and the only way to use a cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import cast
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    TASK_ID_NUM_BYTES,
    ErrorCode,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import (
    _register_node_info_stores,
    _register_nodes,
)
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import ServerApp
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid


class InProcessGrid(InMemoryGrid):
    """Flower's in-memory grid whose nodes are served in this process: pushing messages runs the
    ClientApp on each of them and stores the replies, which the grid then pulls."""

    def __init__(self, client_app: ClientApp, num_supernodes: int, run: Run) -> None:
        state_factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        super().__init__(state_factory, pull_interval=0.0)
        state = cast(InMemoryLinkState, self.state)
        state.run_ids[run.run_id] = RunRecord(run=run)
        task_id = cast(int, run.primary_task_id)
        state.task_store[task_id] = Task(task_id=task_id, run_id=run.run_id)
        self.set_run(run)
        self.client_app = client_app
        self.partitions = _register_nodes(num_supernodes, state_factory)
        self.nodes = _register_node_info_stores(self.partitions, run)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        threads = torch.get_num_threads()  # the server's; a client sets its own
        try:
            for node in dict.fromkeys(m.metadata.dst_node_id for m in messages):
                while pending := self.state.get_message_ins(node_id=node, limit=1):
                    for msg in pending:
                        self.state.store_message_res(self.serve(msg))
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return ids

    def serve(self, msg: Message) -> Message:
        """The ClientApp's reply to ``msg`` on its node, or its exception as an error reply, as
        Flower's simulation worker (``vce_api.worker``) and Ray actor word it."""
        store = self.nodes[msg.metadata.dst_node_id]
        context = store.retrieve_context(run_id=msg.metadata.run_id)
        try:
            try:
                reply = self.client_app(message=msg, context=context)
            except Exception as exc:
                raise ClientAppException(str(exc)) from exc
            store.update_context(msg.metadata.run_id, context=context)
        except ClientAppException as exc:
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply


def new_run() -> Run:
    """A run as ``run_simulation`` creates one for a ServerApp started from Python."""
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    return run


@contextlib.contextmanager
def task_identity(run: Run) -> Iterator[None]:
    """The process identity ``run_simulation`` sets before a ServerApp runs (building a Message
    reads it; task 1: its dummy task for the Python API); restored afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        1,
        run.run_id,
        SUPERLINK_NODE_ID,
    )
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(server_app: ServerApp, client_app: ClientApp, num_supernodes: int) -> Context:
    """Run ``server_app`` against ``num_supernodes`` nodes served by ``client_app`` in this
    process (``run_simulation``'s arguments, without a backend); returns the server's context."""
    run = new_run()
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config=UserConfig(),
        state=RecordDict(),
        run_config=UserConfig(),
    )
    with task_identity(run):
        server_app(grid=InProcessGrid(client_app, num_supernodes, run), context=context)
    return context
