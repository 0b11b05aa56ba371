"""fedalign's replacement of Flower's simulation message dispatch (``fedalign.fl.dispatch``): one
walk over the stored messages per scan, the same one-message-per-node rule, applied only to the
Flower versions it was checked against and undone after the simulation."""

import threading
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api

from fedalign.fl.dispatch import fast_dispatch, registered_partitions, supported, take_pending


class _State:
    """The parts of Flower's in-memory link state that dispatch touches; ``expired`` messages are
    deleted by its check, as Flower's ``_check_stored_messages`` deletes expired ones."""

    def __init__(self, messages, expired=()):
        self.lock = threading.RLock()
        self.message_ins_store = dict(messages)
        self.expired = set(expired)

    def _check_stored_messages(self, ids):
        for msg_id in ids & self.expired:
            del self.message_ins_store[msg_id]


def _message(node, delivered=""):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered))


def test_pending_messages_are_taken_once_at_most_one_per_node_in_store_order():
    store = {
        "a": _message(7),
        "b": _message(5),
        "c": _message(7),  # a second message for node 7 waits for the next scan
        "d": _message(5, delivered="2026-01-01"),
        "e": _message(99),  # not a node of this simulation
        "f": _message(3),  # expired
    }
    state = _State(store, expired={"f"})
    nodes = {7: 0, 5: 1, 3: 2}
    first = take_pending(state, nodes)
    assert first == [store["a"], store["b"]]
    assert all(m.metadata.delivered_at != "" for m in first)
    assert "f" not in state.message_ins_store
    assert take_pending(state, nodes) == [store["c"]]
    assert take_pending(state, nodes) == []


def test_the_replacement_is_version_guarded_and_undone():
    assert supported("1.41.0") and supported("1.42.0")
    assert not supported("1.43.0") and not supported("2.0.0")
    original = vce_api.add_messages_to_queue
    with fast_dispatch(False) as active:
        assert not active and vce_api.add_messages_to_queue is original
    with fast_dispatch(True) as active:
        assert active and vce_api.add_messages_to_queue is not original
    assert vce_api.add_messages_to_queue is original and registered_partitions() is None
