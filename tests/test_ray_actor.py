"""The run's own Ray actor (``fedalign.runs.ray_actor``) runs a client as Flower's
``ClientAppActor`` does (that a worker imports none of Flower's simulation package is
``tests/test_worker_imports.py``'s)."""

import pytest

pytest.importorskip("ray")

from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

from fedalign.runs.ray_actor import ClientRunner


def test_a_client_reply_its_error_and_a_load_error_are_flowers():
    context, message = object(), object()
    seen = []

    def app(message, context):
        seen.append((message, context))
        return "reply"

    assert ClientRunner().run(lambda: app, message, "7", context) == ("7", "reply", context)
    assert seen == [(message, context)]

    def failing(message, context):
        raise ValueError("bad batch")

    with pytest.raises(ClientAppException, match="bad batch"):
        ClientRunner().run(lambda: failing, message, "7", context)

    def not_loadable():
        raise LoadClientAppError("no app")

    with pytest.raises(LoadClientAppError):  # not wrapped: the engine stops on it
        ClientRunner().run(not_loadable, message, "7", context)
    inits = []
    ClientRunner(on_actor_init_fn=lambda: inits.append(1))
    assert inits == [1]
