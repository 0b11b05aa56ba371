"""The Ray actor that a run's own actor pool runs its clients in (``runner.ray_started_early``).

A Ray worker imports an actor's class from the class's module. Flower's ``ClientAppActor`` lives
in ``flwr.simulation.ray_transport.ray_actor``, whose package imports Flower's whole simulation
engine (the SuperLink's link state, SQLAlchemy, Alembic, FastAPI): 0.8-1.0 s of CPU and 77 MiB of
memory in every worker (benchmarks.md, issue 27), for a class of a few lines that a client never
otherwise needs. ``ClientActor`` (``ClientRunner`` as a Ray actor) serves Flower's
``BasicActorPool`` and ``RayBackend`` as that class does: the same ``run`` (the client app
called on the message, errors raised as Flower's ``ClientAppException``, which the simulation
engine reports per client) and ``terminate``.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError


class ClientRunner:
    """Runs the clients Flower's Ray backend sends it, one message at a time (``ClientActor``
    is this class as a Ray actor)."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn is not None:
            on_actor_init_fn()

    def run(
        self, client_app_fn: Callable[[], ClientApp], message: Message, cid: str, context: Context
    ) -> tuple[str, Message, Context]:
        """The client app's reply to ``message`` for client ``cid``, with its context."""
        try:
            out_message = client_app_fn()(message=message, context=context)
        except LoadClientAppError:
            raise  # the engine stops the simulation on it
        except Exception as exc:
            raise ClientAppException(str(exc)) from exc
        return cid, out_message, context

    def terminate(self) -> None:
        """End this actor (the pool's ``terminate_all_actors``)."""
        ray.actor.exit_actor()


ClientActor = ray.remote(ClientRunner)
