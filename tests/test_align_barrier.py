"""Weight matching removes most of the loss barrier between independently trained MLPs."""

import pytest
import torch

from fedalign.align import apply_permutation, permutation_spec, weight_matching
from fedalign.analysis import interpolation_barrier
from fedalign.data import load_dataset
from fedalign.data.fashion_mnist import DEBIAN_DIR
from fedalign.models import build_model
from fedalign.training import train_local


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Fashion-MNIST is not installed (make data)")
def test_weight_matching_shrinks_the_barrier_on_fashion_mnist():
    X, y = load_dataset("fashion-mnist", "train")
    X_test, y_test = load_dataset("fashion-mnist", "test")
    X, y, X_test, y_test = X[:12000], y[:12000], X_test[:2000], y_test[:2000]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("mlp", hidden=[256, 256])
        train_local(model, X, y, epochs=2, batch_size=128, optimizer="adam", lr=1e-3, seed=seed)
        models.append(model.eval())
    a, b = (m.state_dict() for m in models)
    spec = permutation_spec(models[0])
    aligned = apply_permutation(spec, weight_matching(spec, a, b), b)
    naive = interpolation_barrier(models[0], a, b, X_test, y_test, points=11)
    matched = interpolation_barrier(models[0], a, aligned, X_test, y_test, points=11)
    # measured here (2 threads): 0.80 naive against 0.042 matched; the 80% bound leaves margin
    assert naive.loss_barrier > 0.2
    assert matched.loss_barrier < 0.2 * naive.loss_barrier
