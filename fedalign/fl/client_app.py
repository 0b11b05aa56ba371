"""The fedalign ClientApp: local training, local evaluation and the client-info query.

Every message carries the run config (JSON) in its ConfigRecord, so the same ClientApp serves our
runner, ``flwr run`` and a deployed SuperNode without a run-config file on the node. The client's
data partition comes from ``fedalign.data.federation``, cached per worker process.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedalign.components import run_federation, run_model
from fedalign.config import RunConfig, from_dict
from fedalign.fl.faults import apply_fault, fault_for
from fedalign.fl.records import RUN_CONFIG_KEY, to_arrays, to_state_dict
from fedalign.training import evaluate, train_local

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _run_config(text: str) -> RunConfig:
    return from_dict(json.loads(text))


def _setup(msg: Message, context: Context):
    config: ConfigRecord = msg.content["config"]
    cfg = _run_config(str(config[RUN_CONFIG_KEY]))
    partition_id = int(context.node_config["partition-id"])
    fed = run_federation(cfg)
    threads = max(1, int(cfg.simulation.client_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg, config, partition_id, fed


def _received_model(msg: Message, cfg: RunConfig, fed) -> torch.nn.Module:
    """The run's architecture holding the weights the server sent (at their widths)."""
    return run_model(cfg, fed, state=to_state_dict(msg.content["arrays"]))


def local_init_seed(cfg: RunConfig, partition_id: int) -> int:
    """Each client's own initialisation (PFNM and FedMA clients start from different inits)."""
    return int(np.random.SeedSequence([cfg.resolved_seeds.init, partition_id]).generate_state(1)[0])


def client_device(cfg: RunConfig) -> torch.device:
    """The GPU when the run asks for one and this worker sees one, else the CPU."""
    if cfg.simulation.client_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def shuffle_seed(cfg: RunConfig, server_round: int, partition_id: int) -> int:
    """A data-shuffling seed per (run, round, client): reruns repeat, clients differ."""
    words = np.random.SeedSequence([cfg.resolved_seeds.shuffle, server_round, partition_id])
    return int(words.generate_state(1)[0])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, config, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    if str(config.get("client-init", "global")) == "local":
        model = run_model(cfg, fed, init_seed=local_init_seed(cfg, partition_id))
    else:
        model = _received_model(msg, cfg, fed)
    server_round = int(config.get("server-round", 0))
    t = cfg.train
    stats = train_local(
        model,
        data.X_train,
        data.y_train,
        epochs=t.local_epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=shuffle_seed(cfg, server_round, partition_id),
        device=client_device(cfg),
        frozen=[k for k in str(config.get("frozen", "")).split(",") if k],
    )
    metrics = MetricRecord(
        {
            "num-examples": stats.num_examples,
            "train-loss": stats.loss,
            "partition-id": partition_id,
            "class-counts": np.bincount(data.y_train, minlength=fed.num_classes).tolist(),
        }
    )
    state = model.state_dict()
    fault = fault_for(cfg, server_round, partition_id)
    if fault is not None:
        state = apply_fault(fault, state)
    return Message(RecordDict({"arrays": to_arrays(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's validation split (or, when the server asks
    with ``split=train``, on its training split: PFNM picks hyperparameters that way)."""
    cfg, config, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    model = _received_model(msg, cfg, fed)
    X, y = (data.X_train, data.y_train) if config.get("split") == "train" else (data.X_val, data.y_val)
    loss, accuracy = evaluate(model, X, y, device=client_device(cfg))
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "val-loss": 0.0 if np.isnan(loss) else loss,
            "val-accuracy": 0.0 if np.isnan(accuracy) else accuracy,
            "partition-id": partition_id,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """Which partition this node holds and how much data: lets the server map nodes to
    partitions before round 1 (node ids are random, partition ids are what seeds refer to)."""
    _, _, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    metrics = MetricRecord(
        {
            "partition-id": partition_id,
            "num-train": len(data.y_train),
            "num-val": len(data.y_val),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
