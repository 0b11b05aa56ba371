"""The GPU paths of fedalign's pure layer, timed against the CPU in the same run: client training
(``train_local(device=...)``, what a client does when the run asks for GPUs and one is visible),
the server's weight matching and the assignment solvers on CUDA tensors (issue 6, B4 on a GPU),
the aggregation pipeline with its alignment on the GPU (``Plan.device``), and PFNM's BBP-MAP
matching on the GPU (``pfnm(..., device=)``, what strategies pfnm/fedma do with
``simulation.server_device``).
Results must agree with the CPU's: the same permutations, accuracies within noise.

    python simulations/gpu_check.py --data-npz PATH   # X_train, y_train, X_test, y_test arrays
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedalign.algorithms.align import (
    apply_permutation,
    permutation_spec,
    random_permutation,
    solve_assignment,
    weight_matching,
)
from fedalign.algorithms.fusion.neural_matching import pfnm
from fedalign.algorithms.pipeline import Plan, aggregate
from fedalign.algorithms.stats import client_statistics, received_statistics
from fedalign.client.training import evaluate, train_local
from fedalign.models import build_model
from fedalign.runs.studies import load_fashion_mnist, write_json


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-npz", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    X, y, Xt, yt = load_fashion_mnist(args.data_npz)
    report = {"device": torch.cuda.get_device_name(0)}
    for name, options in (("lenet", {}), ("vgg9", {})):
        for device in (cpu, gpu):
            torch.manual_seed(0)
            model = build_model(name, **options)
            _, seconds = timed(
                device,
                train_local,
                model,
                X[:10000],
                y[:10000],
                epochs=1,
                batch_size=64,
                lr=0.01,
                momentum=0.9,
                seed=0,
                device=device,
            )
            accuracy = evaluate(model, Xt, yt, device=device)[1]
            report[f"train_{name}_{device.type}"] = {"seconds": seconds, "test_accuracy": accuracy}
            print(
                f"train {name} 1 epoch on 10,000 images, {device.type}: {seconds:.2f} s, "
                f"test acc {100 * accuracy:.2f}%",
                flush=True,
            )
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
    print(
        f"same permutations on CPU and GPU: {same}; planted permutation recovered: {recovered}",
        flush=True,
    )
    for n in (1024, 4096):
        scores = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        row = {}
        for solver, device in (("hungarian", cpu), ("sinkhorn", cpu), ("sinkhorn", gpu)):
            if solver == "sinkhorn" and device == cpu and n > 1024:
                continue  # minutes on a CPU
            s = scores.to(device)
            assignment, seconds = timed(device, solve_assignment, s, solver)
            value = float(scores[torch.arange(n), assignment.cpu()].sum())
            row[f"{solver}_{device.type}"] = {"seconds": seconds, "objective": value}
            print(
                f"n={n}: {solver} on {device.type}: {seconds:.3f} s, objective {value:.2f}",
                flush=True,
            )
        report[f"solve_{n}"] = row
    # the server's pipeline with its alignment on the GPU (Plan.device, set from server_device)
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = build_model("mlp", hidden=[256, 256])
        train_local(
            model,
            X[2500 * seed : 2500 * (seed + 1)],
            y[2500 * seed : 2500 * (seed + 1)],
            epochs=1,
            seed=seed,
        )
        models.append(model.eval())
    states = [m.state_dict() for m in models]
    stats = [
        received_statistics(client_statistics(("grams",), m, X[:1000], y[:1000]), sd)
        for m, sd in zip(models, states)
    ]
    outcomes = {}
    for device in ("cpu", "cuda"):
        plan = Plan(align="weight", fuse="regmean", device=device)
        outcome, seconds = timed(
            torch.device(device),
            aggregate,
            plan,
            permutation_spec(models[0]),
            states,
            [1.0] * 4,
            stats,
            None,
            None,
        )
        fused = build_model("mlp", hidden=[256, 256])
        fused.load_state_dict(outcome.state)
        outcomes[device] = (outcome.state, evaluate(fused, Xt, yt)[1])
        report[f"pipeline_weight_regmean_{device}"] = {
            "seconds": seconds,
            "test_accuracy": outcomes[device][1],
        }
        print(
            f"pipeline weight/regmean, 4 MLPs 784-256-256-10, alignment on {device}: "
            f"{seconds:.3f} s, test acc {100 * outcomes[device][1]:.2f}%",
            flush=True,
        )
    same = all(
        torch.allclose(outcomes["cpu"][0][k], outcomes["cuda"][0][k], atol=1e-5)
        for k in outcomes["cpu"][0]
    )
    report["pipeline_same_on_both"] = same
    print(f"same fused model with alignment on CPU and on GPU: {same}", flush=True)
    # PFNM's server matching (BBP-MAP cost matrices) on the GPU, as strategy pfnm/fedma run it
    # with simulation.server_device: cuda
    counts = [torch.bincount(y[2500 * j : 2500 * (j + 1)], minlength=10).tolist() for j in range(4)]
    fused_pfnm = {}
    for device in ("cpu", "cuda"):
        (fused, assignment), seconds = timed(
            torch.device(device), pfnm, models, counts, device=device
        )
        fused_pfnm[device] = fused.state_dict()
        accuracy = evaluate(fused, Xt, yt)[1]
        report[f"pfnm_{device}"] = {
            "seconds": seconds,
            "widths": assignment.widths,
            "test_accuracy": accuracy,
        }
        print(
            f"pfnm, 4 MLPs 784-256-256-10, matching on {device}: {seconds:.3f} s, widths "
            f"{assignment.widths}, test acc {100 * accuracy:.2f}%",
            flush=True,
        )
    same = fused_pfnm["cpu"].keys() == fused_pfnm["cuda"].keys() and all(
        fused_pfnm["cpu"][k].shape == fused_pfnm["cuda"][k].shape
        and torch.allclose(fused_pfnm["cpu"][k], fused_pfnm["cuda"][k], atol=1e-5)
        for k in fused_pfnm["cpu"]
    )
    report["pfnm_same_on_both"] = same
    print(f"same PFNM fusion on CPU and on GPU: {same}", flush=True)
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
