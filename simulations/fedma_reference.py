r"""FedMA's layer-wise matching beside IBM/FedMA's ``BBP_MAP`` on the same client models (issue 14).

The reference (IBM/FedMA, ``main.py``) is imported from a checkout given by ``--reference`` (the
folder holding ``main.py``, ``utils.py``, ``model.py``, ``matching/``...); nothing of it is in
this repository. Its imports that this venv lacks are stood in for: ``lapsolver.solve_dense`` by
SciPy's ``linear_sum_assignment`` (the reference's own issue #11 suggests it), ``torchvision`` by
empty modules (only its data loaders use it, and ``get_dataloader`` is replaced by loaders over
the same arrays fedalign trains on). ``BBP_MAP`` writes a pickle under
``./matching_weights_cache/``, so the reference runs in a temporary working directory.

Both sides start from the same locally trained clients: fedalign's LeNet (conv 6 - conv 16 - fc
120 - fc 84, the reference's ``simple-cnn`` on 28x28 inputs, same parameter names and order),
J clients on a Dirichlet split of Fashion-MNIST, each from its own init, SGD with momentum 0.9.
Then one FedMA pass each: match a layer (sigma = sigma0 = 1, gamma 7, 5 sweeps), freeze it,
retrain the layers above ``--retrain-epochs`` (the output layer alone 3x as long at a tenth of
the rate, weight decay 1e-4), next layer; the output layer averaged by class shares.
``--retrain-epochs 0`` removes the retraining, so both matchings see the same inputs at every
layer and only the matching itself can differ. Printed: each side's global widths, test
accuracy, seconds; the clients' own accuracy and their plain average (FedAvg one-shot).

    git --git-dir=/work/.mirror/IBM+FedMA/repo show HEAD:main.py > /tmp/refma/main.py  # etc.
    .venv/bin/python simulations/fedma_reference.py --reference /tmp/refma \
        --clients 10 --alpha 0.5 --epochs 10 --retrain-epochs 0 --popularity reference
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, TensorDataset

from fedalign.algorithms.align import permutation_spec
from fedalign.algorithms.fusion.layer_matching import (
    class_weighted_classifier,
    classifier_keys,
    global_layer,
    hybrid_state,
    match_layer,
    matched_layers,
)
from fedalign.client.training import evaluate, train_local
from fedalign.core.tensors import weighted_average
from fedalign.core.types import StateDict
from fedalign.data import federation
from fedalign.models import build_model, fit_to_state
from fedalign.runs.studies import train_from_own_inits, write_json

WIDTHS = ("conv1", "conv2", "fc1", "fc2")


def stand_in_modules() -> None:
    """``lapsolver`` (SciPy's solver, same minimisation and return value) and an empty
    ``torchvision`` (names resolve to placeholder classes, never called here)."""
    lapsolver = types.ModuleType("lapsolver")
    lapsolver.solve_dense = linear_sum_assignment
    sys.modules.setdefault("lapsolver", lapsolver)

    class Placeholder(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets"):
        sys.modules.setdefault(name, Placeholder(name))


def import_reference(folder: Path) -> types.ModuleType:
    """The reference's ``main`` module. Its top-level modules ``datasets``, ``utils``, ``model``
    share names with installed packages (Hugging Face ``datasets``): those are set aside while
    it imports and put back after, the reference keeping the objects it imported."""
    stand_in_modules()
    clashing = {"datasets", "utils", "model", "matching", "vgg", "combine_nets"}
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in clashing}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("main")
    finally:
        sys.path.remove(str(folder))
        sys.modules.update(saved)
    logging.getLogger().setLevel(logging.WARNING)  # the reference logs every batch at INFO
    return module


def reference_fedma(
    ref: types.ModuleType,
    states: list[StateDict],
    data: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    counts: np.ndarray,
    args: argparse.Namespace,
) -> StateDict:
    """The reference's ``BBP_MAP`` on the clients' models: its weights as a fedalign LeNet."""
    test_set = TensorDataset(torch.as_tensor(test[0]), torch.as_tensor(test[1]))
    pooled = (np.concatenate([X for X, _ in data]), np.concatenate([y for _, y in data]))
    offsets = np.cumsum([0] + [len(y) for _, y in data])
    dataidx = {j: np.arange(offsets[j], offsets[j + 1]) for j in range(len(data))}

    def get_dataloader(dataset, datadir, train_bs, test_bs, dataidxs=None):
        """The reference's loaders over the same arrays; a client's retraining only logs its
        test accuracy, so it gets the test set's first batch (the full set costs minutes)."""
        index = np.arange(len(pooled[1])) if dataidxs is None else dataidxs
        train_set = TensorDataset(
            torch.as_tensor(pooled[0][index]), torch.as_tensor(pooled[1][index])
        )
        shown = test_set if dataidxs is None else torch.utils.data.Subset(test_set, range(test_bs))
        return (
            DataLoader(train_set, batch_size=train_bs, shuffle=True),
            DataLoader(shown, batch_size=test_bs, shuffle=False),
        )

    ref.get_dataloader = get_dataloader
    ref.traindata_cls_counts = {
        j: {k: int(c) for k, c in enumerate(row) if c > 0} for j, row in enumerate(counts)
    }
    nets = []
    for state in states:
        net = ref.SimpleCNNContainer(1, [6, 16], 5, 16 * 4 * 4, [120, 84], 10)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        nets.append(net)
    template = nets[0].state_dict()
    meta = [v.shape for v in template.values()]
    layer_type = list(template)
    shares = counts / counts.sum(0, keepdims=True)
    options = argparse.Namespace(
        model="simple-cnn",
        dataset="mnist",
        batch_size=args.batch_size,
        retrain_lr=args.retrain_lr,
        retrain_epochs=args.retrain_epochs,
        n_nets=len(states),
    )
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        (Path(work) / "matching_weights_cache").mkdir()
        try:
            weights, _ = ref.BBP_MAP(nets, meta, layer_type, dataidx, shares, options)
        finally:
            os.chdir(cwd)
    # the reference's layout: conv (out, in*k*k), linear (in, out)
    state = {}
    for (key, shape), w in zip(zip(layer_type, meta), weights):
        w = torch.as_tensor(np.asarray(w, dtype=np.float32))
        if key.startswith("conv") and key.endswith("weight"):
            w = w.reshape(w.shape[0], -1, *shape[2:])
        elif key.endswith("weight"):
            w = w.T
        state[key] = w.contiguous()
    return state


def fedalign_fedma(
    states: list[StateDict],
    data: list[tuple[np.ndarray, np.ndarray]],
    counts: np.ndarray,
    args: argparse.Namespace,
) -> StateDict:
    """One FedMA pass by ``fusion.layer_matching``'s pieces, the clients retraining in this process
    as the strategy's layer phases do (``strategy.protocol: reference``)."""
    template = build_model("lenet")
    spec = permutation_spec(template)
    layers = matched_layers(spec, template)
    frozen: list[str] = []
    matched: dict[str, torch.Tensor] = {}
    for n, layer in enumerate(layers):
        result = match_layer(states, layer, gamma=7.0, seed=args.seed, popularity=args.popularity)
        glob = global_layer(states, layer, result)
        matched.update(glob.entries)
        frozen += layer.keys
        last = layer is layers[-1]
        hybrids = [hybrid_state(s, layer, glob, j) for j, s in enumerate(states)]
        states = []
        for j, (hybrid, (X, y)) in enumerate(zip(hybrids, data)):
            model = fit_to_state(build_model("lenet"), hybrid)
            if args.retrain_epochs:
                train_local(
                    model,
                    X,
                    y,
                    epochs=args.retrain_epochs * (3 if last else 1),
                    batch_size=args.batch_size,
                    lr=args.retrain_lr / (10 if last else 1),
                    momentum=0.9,
                    weight_decay=1e-4 if last else 0.0,
                    seed=1000 * (n + 1) + j,
                    frozen=frozen,
                )
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    keys = classifier_keys(layers, states[0])
    return {**states[0], **matched, **class_weighted_classifier(states, keys, counts.tolist())}


def widths(state: StateDict) -> dict[str, int]:
    return {name: state[f"{name}.weight"].shape[0] for name in WIDTHS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10, help="local epochs before matching")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--popularity",
        choices=("consistent", "reference"),
        default="consistent",
        help="fedalign's popularity term (reference: the reference's 1 log)",
    )
    parser.add_argument(
        "--sides", nargs="+", choices=("reference", "fedalign"), default=["reference", "fedalign"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fedalign-oneshot-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = import_reference(args.reference.resolve())

    fed = federation(
        "fashion-mnist",
        args.clients,
        "dirichlet",
        seed=args.seed,
        val_fraction=0.0,
        alpha=args.alpha,
        min_partition_size=10,
    )
    clients = [fed.client(j) for j in range(args.clients)]
    data = [(c.X_train, c.y_train) for c in clients]
    counts = np.array([np.bincount(y, minlength=10) for _, y in data], dtype=float)
    models = train_from_own_inits(
        lambda: build_model("lenet"),
        data,
        [1000 + j for j in range(args.clients)],
        cache=args.cache,
        key=f"fmnist-dirichlet-a{args.alpha}-J{args.clients}-lenet-s{args.seed}",
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=args.lr,
        momentum=0.9,
    )
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    X_test, y_test = fed.test

    def accuracy(state: StateDict) -> float:
        return evaluate(fit_to_state(build_model("lenet"), state), X_test, y_test)[1]

    local = [accuracy(s) for s in states]
    average = weighted_average(states, [len(y) for _, y in data])
    rows: dict[str, Any] = {
        "clients": {"mean": float(np.mean(local)), "each": local},
        "average": {"test": accuracy(average), "widths": widths(average)},
    }
    print({k: v for k, v in rows["clients"].items() if k == "mean"}, rows["average"], flush=True)
    sides = {
        "reference": lambda: reference_fedma(
            ref, copy.deepcopy(states), data, fed.test, counts, args
        ),
        "fedalign": lambda: fedalign_fedma(copy.deepcopy(states), data, counts, args),
    }
    for side in args.sides:
        fuse = sides[side]
        t = time.perf_counter()
        fused = fuse()
        seconds = time.perf_counter() - t
        rows[side] = {"widths": widths(fused), "test": accuracy(fused), "seconds": seconds}
        print(side, rows[side], flush=True)
    if args.out:
        setting = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_json(args.out, {"setting": setting, **rows})


if __name__ == "__main__":
    main()
