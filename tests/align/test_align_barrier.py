"""Weight matching removes most of the loss barrier between independently trained MLPs."""

import pytest

from fedalign.algorithms.align import apply_permutation, permutation_spec, weight_matching
from fedalign.algorithms.analysis import interpolation_barrier
from fedalign.client.training import train_local
from fedalign.data import load_dataset
from fedalign.data.fashion_mnist import DEBIAN_DIR
from tests.helpers import seeded_model


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Fashion-MNIST is not installed (make data)")
def test_weight_matching_removes_most_of_the_barrier_on_fashion_mnist():
    X, y = load_dataset("fashion-mnist", "train")
    X_test, y_test = load_dataset("fashion-mnist", "test")
    X, y, X_test, y_test = X[:20000], y[:20000], X_test[:2000], y_test[:2000]
    models = []
    for seed in (0, 1):
        model = seeded_model("mlp", seed, hidden=[256, 256])
        train_local(model, X, y, epochs=3, batch_size=128, optimizer="adam", lr=1e-3, seed=seed)
        models.append(model.eval())
    a, b = (m.state_dict() for m in models)
    spec = permutation_spec(models[0])
    aligned = apply_permutation(spec, weight_matching(spec, a, b), b)
    naive = interpolation_barrier(models[0], a, b, X_test, y_test, points=11)
    matched = interpolation_barrier(models[0], a, aligned, X_test, y_test, points=11)
    # measured with this setup for seed pairs (0,1), (2,3), (4,5): naive 0.68-0.80, matched
    # 0.017-0.031 (2.5-4% of naive), midpoint accuracy 66-72% naive, 85-86% matched; the bound
    # is issue 3's 80% reduction (a 5x margin)
    assert naive.loss_barrier > 0.3
    assert matched.loss_barrier < 0.2 * naive.loss_barrier
    assert matched.accuracy[matched.midpoint] > naive.accuracy[naive.midpoint] + 0.05
