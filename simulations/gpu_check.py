"""The GPU paths of fedalign's pure layer, timed against the CPU in the same run: client training
(``train_local(device=...)``, what a client does when the run asks for GPUs and one is visible),
the server's weight matching and the assignment solvers on CUDA tensors (issue 6, B4 on a GPU).
Results must agree with the CPU's: the same permutations, accuracies within noise.

    python simulations/gpu_check.py --data-npz PATH   # X_train, y_train, X_test, y_test arrays
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedalign.align import (
    apply_permutation,
    permutation_spec,
    random_permutation,
    solve_assignment,
    weight_matching,
)
from fedalign.models import build_model
from fedalign.training import evaluate, train_local


def timed(on: torch.device, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and its wall time, the GPU's queue drained on both ends."""
    if on.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if on.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-npz", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    if args.data_npz:
        data = np.load(args.data_npz)
        X, y, Xt, yt = (torch.as_tensor(data[k]) for k in ("X_train", "y_train", "X_test", "y_test"))
    else:
        from fedalign.data import load_dataset
        X, y = (torch.as_tensor(a) for a in load_dataset("fashion-mnist", "train"))
        Xt, yt = (torch.as_tensor(a) for a in load_dataset("fashion-mnist", "test"))
    report = {"device": torch.cuda.get_device_name(0)}
    for name, options in (("lenet", {}), ("vgg9", {})):
        for device in (cpu, gpu):
            torch.manual_seed(0)
            model = build_model(name, **options)
            _, seconds = timed(device, train_local, model, X[:10000], y[:10000], epochs=1, batch_size=64, lr=0.01,
                               momentum=0.9, seed=0, device=device)
            accuracy = evaluate(model, Xt, yt, device=device)[1]
            report[f"train_{name}_{device.type}"] = {"seconds": seconds, "test_accuracy": accuracy}
            print(f"train {name} 1 epoch on 10,000 images, {device.type}: {seconds:.2f} s, test acc {100 * accuracy:.2f}%",
                  flush=True)
    torch.manual_seed(0)
    base = build_model("mlp", hidden=[1024, 1024])
    spec = permutation_spec(base)
    planted = random_permutation(spec, torch.Generator().manual_seed(1))
    other = apply_permutation(spec, planted, base.state_dict())
    found = {}
    for device in (cpu, gpu):
        ref = {k: v.to(device) for k, v in base.state_dict().items()}
        oth = {k: v.to(device) for k, v in other.items()}
        perms, seconds = timed(device, weight_matching, spec, oth, ref)
        found[device.type] = {g: p.cpu() for g, p in perms.items()}
        report[f"weight_matching_mlp1024x2_{device.type}_s"] = seconds
        print(f"weight matching, MLP 784-1024-1024-10, {device.type}: {seconds:.3f} s", flush=True)
    same = all(torch.equal(found["cpu"][g], found["cuda"][g]) for g in found["cpu"])
    recovered = all(torch.equal(found["cuda"][g], planted[g]) for g in planted)
    report["weight_matching_same_on_both"], report["planted_recovered"] = same, recovered
    print(f"same permutations on CPU and GPU: {same}; planted permutation recovered: {recovered}", flush=True)
    for n in (1024, 4096):
        scores = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        row = {}
        for solver, device in (("hungarian", cpu), ("sinkhorn", cpu), ("sinkhorn", gpu)):
            if solver == "sinkhorn" and device == cpu and n > 1024:
                continue                       # minutes on a CPU
            s = scores.to(device)
            assignment, seconds = timed(device, solve_assignment, s, solver)
            value = float(scores[torch.arange(n), assignment.cpu()].sum())
            row[f"{solver}_{device.type}"] = {"seconds": seconds, "objective": value}
            print(f"n={n}: {solver} on {device.type}: {seconds:.3f} s, objective {value:.2f}", flush=True)
        report[f"solve_{n}"] = row
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
