"""Training seconds per example of each shipped config's model, against LeNet's, in one sitting.

The README's expected wall times scale one measured round (LeNet on Fashion-MNIST, docs/
benchmarks.md) to the other configs by these ratios: a ratio measured side by side holds on a
busy machine, where absolute times do not. Each model trains a few seconds on one batch of its
own test data (one torch thread, as a client with ``client_cpus: 1`` does).

    .venv/bin/python simulations/time_per_sample.py configs/fmnist_lenet_fedavg.yaml \\
        configs/fmnist_resnet20.yaml configs/fmnist_vgg9.yaml configs/fortunes_char_lstm.yaml
"""

from __future__ import annotations

import argparse
import time

import torch

from fedalign.config.components import run_federation, run_model
from fedalign.config.load import load_config


def seconds_per_example(config: str, seconds: float) -> tuple[float, int]:
    """Training seconds per example of the config's model and its total training examples."""
    cfg = load_config(config)
    fed = run_federation(cfg)
    model = run_model(cfg, fed)
    X, y = fed.test
    size = cfg.train.batch_size
    inputs, labels = torch.as_tensor(X[:size]), torch.as_tensor(y[:size])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )
        loss.backward()
        optimizer.step()

    step()  # warm-up
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    examples = sum(fed.client(i).num_train for i in range(fed.num_clients))
    return (time.perf_counter() - t0) / (steps * size), examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="configs; the first is the reference")
    parser.add_argument("--seconds", type=float, default=3.0, help="training time per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [(c, *seconds_per_example(c, args.seconds)) for c in args.configs]
    reference = rows[0][1]
    print("| config | ms per example | x reference | training examples |")
    print("|---|---|---|---|")
    for config, per, examples in rows:
        print(f"| {config} | {1e3 * per:.3f} | {per / reference:.1f} | {examples} |")


if __name__ == "__main__":
    main()
