"""fedalign's ClientApp trains as long and as fast as a train message's schedule entries say
(``strategy.protocol: reference`` sends them per phase), called as Flower calls it, without
Ray."""

from __future__ import annotations

import math

import torch
from flwr.app import Context, Message, RecordDict

from fedalign.config.components import run_federation, run_model
from fedalign.config.load import load_config
from fedalign.core.types import StateDict
from fedalign.fl.client_app import app
from fedalign.fl.records import config_record, to_arrays, to_state_dict
from tests.fl.mock_grid import task_identity
from tests.helpers import DIGITS


def train(entries: dict) -> tuple[StateDict, StateDict, dict]:
    """The model sent, the model returned and the reply's metrics of one train message to
    partition 0 (digits MLP, 1 local epoch, batch 32) carrying ``entries``."""
    cfg = load_config(DIGITS, ["train.local_epochs=1", "train.batch_size=32"])
    sent = run_model(cfg, run_federation(cfg), init_seed=0).state_dict()
    config = config_record(cfg.to_json(), **{"server-round": 2, **entries})
    content = RecordDict({"arrays": to_arrays(sent), "config": config})
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    with task_identity():
        reply = app(Message(content, dst_node_id=1, message_type="train"), context)
    return sent, to_state_dict(reply.content["arrays"]), dict(reply.content["metrics"])


def test_the_client_trains_the_epochs_and_rate_the_server_sends() -> None:
    sent, plain, metrics = train({})
    batches = math.ceil(metrics["num-examples"] / 32)
    assert metrics["local-steps"] == batches
    _, scheduled, metrics = train({"epochs": 3, "lr": 1e-9})
    assert metrics["local-steps"] == 3 * batches
    torch.testing.assert_close(scheduled, sent, rtol=0, atol=1e-6)  # a rate of 1e-9 barely moves
    assert max(float((plain[k] - sent[k]).abs().max()) for k in sent) > 1e-3  # the config's does
