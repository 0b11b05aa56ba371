r"""Where alignment pays for transformers (issue 24, item 5): character transformers on fortunes.

Two parts, sized for a loaded 2-core CPU (tiny models: ``--d-model 32``, 2 layers, 4 heads, a
context of 32 characters; a few thousand windows per client):

``barrier``: ``--models`` (5) char transformers, each from its own init on its own natural client
of fortunes (the largest categories). For the pair (0, 1) and for all five: the test loss of the
fused model (the midpoint for two) against the mean of the endpoints' losses (the barrier), with
no alignment, weight matching with heads matched both ways (``heads=both``: whole heads and the
dimensions inside them), inside heads only (``inner``) and as blocks only (``blocks``),
activation matching (heads both ways), Sinkhorn re-basin (pair only, heads as blocks) and each
of weight/activation matching followed by REPAIR (the pre-activations of every biased Linear: the
query, key, value, output and feed-forward maps; LayerNorm outputs are not tracked by the repair
rules). One-shot fusion (mean, RegMean, Fisher) is read against the prediction ensemble and the
best client. Everything runs through ``fedalign.aggregate_local`` (as ``fedalign merge``).

``federation``: ``--clients`` (10) natural clients, every client from its own init in round 1,
``--epochs`` local epochs a round, ``--rounds`` rounds, through ``runs.studies.pipeline_rounds``
(the server's ``pipeline.aggregate``, no Flower): FedAvg, weight/mean, weight/regmean,
activation/mean, ``--seeds`` seeds, the final test accuracy and loss with 95% t intervals
(``fedalign.report.intervals``) and the values each method sends up.

    .venv/bin/python simulations/transformer_study.py barrier \
        --out docs/results/transformer_barrier.json
    .venv/bin/python simulations/transformer_study.py federation --seeds 0 1 2 \
        --out docs/results/transformer_federation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedalign
from fedalign.algorithms.align import (
    activation_statistics,
    apply_permutation,
    permutation_spec,
    permutations_from_statistics,
    sinkhorn_rebasin,
)
from fedalign.algorithms.repair import repair_with_data
from fedalign.client.training import evaluate
from fedalign.data import federation
from fedalign.models import build_model
from fedalign.report.intervals import t_interval
from fedalign.runs.studies import baseline_rows, pipeline_rounds, train_from_own_inits, write_json

FUSIONS = {  # label -> plan
    "average": fedalign.Plan(),
    "weight/mean": fedalign.Plan(align="weight"),
    "weight/regmean": fedalign.Plan(align="weight", fuse="regmean"),
    "weight/fisher": fedalign.Plan(align="weight", fuse="fisher"),
    "activation/mean": fedalign.Plan(align="activation"),
    "activation (all sites)/mean": fedalign.Plan(
        align="activation", options={"activation_sites": "all"}
    ),
    "weight/mean+repair": fedalign.Plan(align="weight", repair="repair"),
}
FEDERATION = {
    "fedavg": fedalign.Plan(),
    "weight/mean": fedalign.Plan(align="weight"),
    "weight/regmean": fedalign.Plan(align="weight", fuse="regmean"),
    "activation/mean": fedalign.Plan(align="activation"),
    "activation (all sites)/mean": fedalign.Plan(
        align="activation", options={"activation_sites": "all"}
    ),
}


def clients(args: argparse.Namespace, count: int) -> tuple[list, tuple]:
    """The ``count`` largest natural clients of fortunes (windows of ``--context`` characters),
    each cut to ``--per-client`` windows, and ``--test`` test windows."""
    fed = federation(
        "fortunes",
        count,
        "natural",
        seed=0,
        val_fraction=0.0,
        dataset_options={"seq_len": args.context},
    )
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        data = fed.client(i)
        keep = rng.permutation(len(data.y_train))[: args.per_client]
        out.append((torch.as_tensor(data.X_train[keep]), torch.as_tensor(data.y_train[keep])))
    X, y = fed.test
    keep = rng.permutation(len(y))[: args.test]
    return out, (torch.as_tensor(X[keep]), torch.as_tensor(y[keep]))


def builder(args: argparse.Namespace):
    options = {
        "d_model": args.d_model,
        "heads": args.heads,
        "layers": args.layers,
        "ff": 2 * args.d_model,
        "context": args.context,
        "vocab_size": 98,
    }
    return lambda: build_model("char_transformer", **options)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": args.epochs, "batch_size": 64, "optimizer": "adam", "lr": args.lr}


def fused_loss(build, state, test) -> tuple[float, float]:
    model = build()
    model.load_state_dict(state)
    return evaluate(model.eval(), *test)


def barrier(args: argparse.Namespace) -> dict:
    build = builder(args)
    data, test = clients(args, args.models)
    t0 = time.perf_counter()
    models = train_from_own_inits(
        build,
        data,
        list(range(args.models)),
        cache=args.cache,
        key=f"fortunes{args.context}-d{args.d_model}h{args.heads}l{args.layers}n{args.per_client}",
        **train_options(args),
    )
    trained = time.perf_counter() - t0
    out: dict[str, Any] = {"train_seconds": trained, "groups": {}}
    samples = [(X[: args.stat_samples], y[: args.stat_samples]) for X, y in data]
    for label, members in (("pair", [0, 1]), ("five", list(range(args.models)))):
        chosen = [models[j] for j in members]
        states = [m.state_dict() for m in chosen]
        own = [evaluate(m, *test) for m in chosen]
        local, rows = baseline_rows(chosen, *test)
        mean_loss = float(np.mean([loss for loss, _ in own]))
        row: dict[str, Any] = {
            "endpoint_loss": [loss for loss, _ in own],
            "local_accuracy": local,
            **rows,
            "fused": {},
        }
        weights = [1.0] * len(states)
        for name, plan in FUSIONS.items():
            for heads in ("both", "inner", "blocks") if name == "weight/mean" else (None,):
                key = name if heads in (None, "both") else f"{name} (heads={heads})"
                t = time.perf_counter()
                state = fedalign.aggregate_local(
                    dataclasses.replace(plan, heads=heads) if heads else plan,
                    build(),
                    states,
                    weights,
                    [samples[j] for j in members],
                ).state
                loss, acc = fused_loss(build, state, test)
                row["fused"][key] = {
                    "loss": loss,
                    "accuracy": acc,
                    "barrier": loss - mean_loss,
                    "seconds": time.perf_counter() - t,
                }
                print(label, key, row["fused"][key], flush=True)
        if label == "pair":
            row["fused"].update(pair_extras(args, build, chosen, samples[:2], test, mean_loss))
        out["groups"][label] = row
    return out


def pair_extras(args, build, pair, samples, test, mean_loss) -> dict[str, dict]:
    """Sinkhorn re-basin (heads as blocks) and activation matching + REPAIR for the pair,
    through the align functions directly (the midpoint of the aligned pair)."""
    a, b = (m.state_dict() for m in pair)
    X = torch.cat([s[0] for s in samples])
    rows = {}
    t = time.perf_counter()
    blocks = permutation_spec(pair[0], X[:2], heads="blocks")
    aligned = apply_permutation(
        blocks, sinkhorn_rebasin(blocks, a, b, steps=args.sinkhorn_steps), b
    )
    rows["sinkhorn-rebasin/mean"] = (aligned, None, t)
    t = time.perf_counter()
    spec = permutation_spec(pair[0], X[:2])
    stats = activation_statistics(spec, pair[0], pair[1], X, sites="all")
    act = apply_permutation(spec, permutations_from_statistics(stats, spec=spec), b)
    rows["activation (all sites)/mean+repair"] = (act, True, t)
    out = {}
    for key, (other, repaired, t) in rows.items():
        mid = build()
        mid.load_state_dict({k: (a[k] + other[k]) / 2 for k in a})
        state = mid.state_dict()
        if repaired:
            endpoint = build()
            endpoint.load_state_dict(other)
            state = repair_with_data(mid, [pair[0], endpoint], X)
        loss, acc = fused_loss(build, state, test)
        out[key] = {
            "loss": loss,
            "accuracy": acc,
            "barrier": loss - mean_loss,
            "seconds": time.perf_counter() - t,
        }
        print("pair", key, out[key], flush=True)
    return out


def federation_study(args: argparse.Namespace) -> dict:
    build = builder(args)
    data, test = clients(args, args.clients)
    out: dict[str, Any] = {"runs": {}, "summary": {}}
    for name in args.methods:
        plan = FEDERATION[name]
        finals = {"accuracy": [], "loss": []}
        for seed in args.seeds:
            t = time.perf_counter()
            history = pipeline_rounds(
                plan,
                build,
                data,
                test,
                args.rounds,
                own_init=True,
                seed=seed,
                **train_options(args),
            )
            out["runs"][f"{name}/seed{seed}"] = {
                "history": history,
                "seconds": time.perf_counter() - t,
            }
            finals["accuracy"].append(history[-1]["accuracy"])
            finals["loss"].append(history[-1]["loss"])
            print(name, seed, history[-1], round(time.perf_counter() - t, 1), flush=True)
        out["summary"][name] = {
            k: {"mean": (i := t_interval(v)).mean, "low": i.low, "high": i.high, "values": v}
            for k, v in finals.items()
        } | {"values_up_per_round": history[-1]["values_up"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=("barrier", "federation"))
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=3000)
    parser.add_argument("--test", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--stat-samples", type=int, default=500)
    parser.add_argument("--sinkhorn-steps", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(FEDERATION), choices=list(FEDERATION))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = barrier(args) if args.part == "barrier" else federation_study(args)
    result |= {
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
