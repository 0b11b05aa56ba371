"""The fedalign ClientApp: local training, local evaluation, the client-info query and the
statistics query of the aggregation pipeline (``fedalign.algorithms.pipeline``).

Every message carries the run config (JSON) in its ConfigRecord, so the same ClientApp serves our
runner, ``flwr run`` and a deployed SuperNode without a run-config file on the node. The client's
data partition comes from the run's shared data copy when the message names one
(``fedalign.data.shared``), else from ``fedalign.data.federation``, cached per worker process.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedalign.algorithms.stats import StatContext, client_statistics, flatten, unflatten
from fedalign.client.state import ClientState
from fedalign.client.training import TrainStats, evaluate
from fedalign.config.components import (
    local_init_seed,
    phase_training,
    run_federation,
    run_model,
    shuffle_seed,
    train_client,
)
from fedalign.config.load import from_dict
from fedalign.config.schema import RunConfig
from fedalign.core.plugins import load_from_environment
from fedalign.core.registry import STRATEGIES
from fedalign.fl.faults import apply_fault, fault_for
from fedalign.fl.records import (
    DATA_COPY_KEY,
    RUN_CONFIG_KEY,
    to_arrays,
    to_state_dict,
)

app = ClientApp()
log = logging.getLogger("fedalign")

# A user's models, datasets and rules, registered in the driver, registered here too (Ray workers
# import this module before their first message).
load_from_environment()


@functools.lru_cache(maxsize=4)
def _run_config(text: str) -> RunConfig:
    return from_dict(json.loads(text))


def _setup(msg: Message, context: Context):
    config: ConfigRecord = msg.content["config"]
    cfg = _run_config(str(config[RUN_CONFIG_KEY]))
    partition_id = int(context.node_config["partition-id"])
    fed = run_federation(cfg, config.get(DATA_COPY_KEY))
    threads = max(1, int(cfg.simulation.client_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg, config, partition_id, fed


def _received_model(msg: Message, cfg: RunConfig, fed) -> torch.nn.Module:
    """The run's architecture holding the weights the server sent (at their widths)."""
    return run_model(cfg, fed, state=to_state_dict(msg.content["arrays"]))


def client_device(cfg: RunConfig) -> torch.device:
    """The GPU when the run asks for one and this worker sees one, else the CPU (logged once per
    worker process, with the reason when a GPU was asked for and none is visible)."""
    wanted = cfg.simulation.client_gpus > 0
    device = torch.device("cuda" if wanted and torch.cuda.is_available() else "cpu")
    _log_device(str(device), wanted)
    return device


@functools.cache
def _log_device(device: str, gpu_wanted: bool) -> None:
    if gpu_wanted and device == "cpu":
        log.warning("client_gpus > 0 but this worker sees no CUDA device: clients train on the CPU")
    else:
        log.info("clients of this worker train on %s", device)


def ray_node_metric() -> dict[str, int]:
    """``{"ray-node": n}``: the Ray node this client runs on (its id's first 12 hex digits), so a
    run on a cluster records where its clients trained; empty outside a Ray actor (the in-process
    backend never imports Ray: a Ray worker has it imported already)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return {}
    return {"ray-node": int(ray.get_runtime_context().get_node_id()[:12], 16)}


def strategy_state(cfg: RunConfig, msg: Message, state: RecordDict) -> ClientState | None:
    """The strategy's client-side hook for this train message (``Strategy.client_state``), built
    from the message's extra array records and this node's stored ones (``state``: its
    ``Context.state``); None when the strategy keeps no state on its clients or the message
    carries none of it."""
    hook = STRATEGIES.get(cfg.strategy.name).obj.client_state
    if hook is None:  # most strategies: nothing to convert
        return None
    received = {
        name: to_state_dict(record)
        for name, record in msg.content.array_records.items()
        if name != "arrays"
    }
    if not hook.applies(received):
        return None
    stored = {name: to_state_dict(record) for name, record in state.array_records.items()}
    return hook(received, stored, to_state_dict(msg.content["arrays"]))


def store(hook: ClientState, state: RecordDict) -> None:
    """Keep what the hook left in its stored records in the node's state for the next round."""
    for name, stored in hook.stored.items():
        state[name] = to_arrays(stored)


def train_reply_metrics(stats: TrainStats, partition_id: int, counts: list[int]) -> dict[str, Any]:
    """What every train reply reports besides its weights (FedNova reads ``local-steps``)."""
    return {
        "num-examples": stats.num_examples,
        "train-loss": stats.loss,
        "local-steps": stats.steps,
        "partition-id": partition_id,
        "class-counts": counts,
    }


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, config, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    hook = strategy_state(cfg, msg, context.state)
    model = None
    if str(config.get("client-init", "global")) == "local":
        model = run_model(cfg, fed, init_seed=local_init_seed(cfg, partition_id))
    elif hook is not None:  # a base the client builds itself, with what it was sent (LoRA)
        model = hook.model(lambda: run_model(cfg, fed, init_seed=cfg.resolved_seeds.init), cfg)
    if model is None:
        model = _received_model(msg, cfg, fed)
    server_round = int(config.get("server-round", 0))
    frozen = [k for k in str(config.get("frozen", "")).split(",") if k]
    phase = phase_training(config)  # the server's overrides of train for this exchange
    stats = train_client(
        cfg,
        model,
        data.X_train,
        data.y_train,
        server_round,
        partition_id,
        frozen,
        client_device(cfg),
        objective_inputs=None if hook is None else hook.objective_inputs(),
        phase=phase,
    )
    counts = np.bincount(data.y_train, minlength=fed.num_classes).tolist()
    metrics = MetricRecord(
        {**train_reply_metrics(stats, partition_id, counts), **ray_node_metric()}
    )
    content = RecordDict({"metrics": metrics})
    if hook is not None:
        replies = hook.after_train(model.cpu().state_dict(), stats, phase.get("lr", cfg.train.lr))
        for name, state in replies.items():
            content[name] = to_arrays(state)
        store(hook, context.state)
    kinds = _kinds(config)
    if kinds:  # what the server's pipeline needs of the trained model (before a fault corrupts it)
        content["statistics"] = _statistics(cfg, kinds, model, data, partition_id)
    state = model.state_dict() if hook is None else hook.reply(model)
    fault = fault_for(cfg, server_round, partition_id)
    if fault is not None:
        state = apply_fault(fault, state)
    content["arrays"] = to_arrays(state)
    return Message(content, reply_to=msg)


def _kinds(config: ConfigRecord) -> list[str]:
    return [k for k in str(config.get("statistics", "")).split(",") if k]


def _statistics(
    cfg: RunConfig,
    kinds: list[str],
    model: torch.nn.Module,
    data,
    partition_id: int,
    **context: Any,
) -> ArrayRecord:
    """Statistics of ``model`` on (a seeded sample of ``aggregation.stats_samples`` of) this
    client's training data, flattened for transport."""
    a = cfg.aggregation
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    if 0 < a.stats_samples < len(y):
        rng = np.random.default_rng([cfg.resolved_seeds.shuffle, partition_id])
        index = torch.as_tensor(np.sort(rng.choice(len(y), a.stats_samples, replace=False)))
        X, y = X[index], y[index]
    stats = client_statistics(
        kinds,
        model.cpu(),
        X,
        y,
        StatContext(seed=shuffle_seed(cfg, 0, partition_id), **context),
        options=a.options,
    )
    return to_arrays(flatten(stats))


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's validation split (or, when the server asks
    with ``split=train``, on its training split: PFNM picks hyperparameters that way)."""
    cfg, config, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    model = _received_model(msg, cfg, fed)
    X, y = (
        (data.X_train, data.y_train) if config.get("split") == "train" else (data.X_val, data.y_val)
    )
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


@app.query("statistics")
def statistics(msg: Message, context: Context) -> Message:
    """Statistics of the model the server sends (``arrays``) on this client's data: against a
    ``reference`` model (alignment phase) or through reset layers set to ``targets`` (REPAIR)."""
    cfg, config, partition_id, fed = _setup(msg, context)
    data = fed.client(partition_id)
    model = _received_model(msg, cfg, fed)
    extra: dict[str, Any] = {}
    if "reference" in msg.content:
        extra["reference"] = run_model(cfg, fed, state=to_state_dict(msg.content["reference"]))
    if "targets" in msg.content:
        flat = unflatten(to_state_dict(msg.content["targets"]))
        extra["targets"] = {layer: (t["mean"], t["std"]) for layer, t in flat.items()}
    record = _statistics(cfg, _kinds(config), model, data, partition_id, **extra)
    metrics = MetricRecord({"partition-id": partition_id, "num-examples": len(data.y_train)})
    return Message(RecordDict({"statistics": record, "metrics": metrics}), reply_to=msg)


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
