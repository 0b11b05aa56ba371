"""The studies' shared helpers (fedalign.runs.studies) and the barrier options they rely on
(``interpolation_barrier``'s ``reset_bn`` and ``correct``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedalign.algorithms.align import apply_permutation, permutation_spec, random_permutation
from fedalign.algorithms.analysis import interpolate, interpolation_barrier
from fedalign.client.training import evaluate, predict_logits, train_local
from fedalign.models import build_model
from fedalign.runs import studies


def _bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def _stale_bn_pair() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    a, b = _bn_net(), _bn_net()
    for m in (a[1], b[1]):
        m.running_mean.uniform_(-3, 3)
        m.running_var.uniform_(5, 9)
    return a.eval(), b.eval()


def _data(n: int = 200, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


# ---- interpolation_barrier's options -----------------------------------------------------------


def test_without_bn_reset_every_point_keeps_its_interpolated_running_statistics():
    a, b = _stale_bn_pair()
    X, y = _data()
    kept = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=3, reset_bn=False)
    reset = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=3)
    for k, lam in enumerate(kept.lambdas):
        net = _bn_net()
        net.load_state_dict(interpolate(a.state_dict(), b.state_dict(), lam))
        assert kept.loss[k] == pytest.approx(evaluate(net, X, y)[0], rel=1e-6)
    assert kept.loss[0] != pytest.approx(reset.loss[0], rel=1e-3)  # the reset changes the curve
    assert a[1].running_mean.abs().max() > 0.5  # model left untouched


def test_correct_runs_at_interior_points_on_the_cpu_and_its_state_is_evaluated():
    torch.manual_seed(0)
    X, y = _data(d=20)
    a, b = nn.Linear(20, 3), nn.Linear(20, 3)
    seen = []

    def back_to_a(net: nn.Module, lam: float) -> dict[str, torch.Tensor]:
        seen.append((lam, next(net.parameters()).device.type))
        return a.state_dict()

    r = interpolation_barrier(a, a.state_dict(), b.state_dict(), X, y, points=5, correct=back_to_a)
    assert seen == [(0.25, "cpu"), (0.5, "cpu"), (0.75, "cpu")]
    own_a, own_b = evaluate(a, X, y, 1000)[0], evaluate(b, X, y, 1000)[0]
    assert r.loss[0] == own_a and r.loss[-1] == own_b  # endpoints as trained
    assert r.loss[1:-1] == [own_a] * 3  # interior: corrected model
    assert own_a != pytest.approx(own_b, rel=1e-3)


# ---- midpoint barrier --------------------------------------------------------------------------


def test_midpoint_barrier_is_the_midpoint_loss_minus_the_endpoints_mean_loss():
    a, b = _stale_bn_pair()
    X, y = _data()
    r = studies.midpoint_barrier(a, a.state_dict(), b.state_dict(), X, y)
    mid = _bn_net()
    mid.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
    (la, aa), (lb, ab), (lm, am) = (evaluate(m, X, y) for m in (a, b, mid))  # no BN reset anywhere
    assert r.lambdas == [0.0, 0.5, 1.0]
    assert r.midpoint_loss_barrier == pytest.approx(lm - (la + lb) / 2, abs=1e-12)
    row = studies.barrier_row(r)
    assert row == {
        "midpoint_loss": lm,
        "midpoint_accuracy": am,
        "barrier": r.midpoint_loss_barrier,
        "endpoint_accuracy": [aa, ab],
    }


def test_midpoint_barrier_passes_the_correction():
    a, b = _stale_bn_pair()
    X, y = _data()
    r = studies.midpoint_barrier(
        a, a.state_dict(), b.state_dict(), X, y, correct=lambda net, lam: b.state_dict()
    )
    assert r.loss[1] == r.loss[2] and r.loss[0] != pytest.approx(r.loss[2], rel=1e-3)


# ---- training from own inits, with a cache -----------------------------------------------------


def _mlp() -> nn.Module:
    return build_model("mlp", in_features=4, hidden=[8], num_classes=3)


def _client_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(40, 1, 2, 2, generator=g), torch.randint(0, 3, (40,), generator=g))
        for _ in range(2)
    ]


OPTIONS = {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9}


def test_own_init_models_are_what_seeding_building_and_training_by_hand_give():
    data = _client_data()
    models = studies.train_from_own_inits(_mlp, data, [1000, 1001], [0, 1], **OPTIONS)
    for model, (X, y), init, shuffle in zip(models, data, (1000, 1001), (0, 1)):
        torch.manual_seed(init)
        expected = _mlp()
        train_local(expected, X, y, seed=shuffle, **OPTIONS)
        assert not model.training
        for k, v in expected.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)
    first, second = (m.state_dict()["layers.0.weight"] for m in models)
    assert not torch.equal(first, second)


def test_cache_is_written_once_then_read_and_keyed_by_the_training_options(tmp_path, monkeypatch):
    data = _client_data()
    first = studies.train_from_own_inits(_mlp, data, [3, 4], cache=tmp_path, key="toy", **OPTIONS)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("toy-") and "lr0.1" in f for f in files)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(studies, "train_local", no_training)
    again = studies.train_from_own_inits(_mlp, data, [3, 4], cache=tmp_path, key="toy", **OPTIONS)
    for m, n in zip(first, again):
        assert all(torch.equal(v, n.state_dict()[k]) for k, v in m.state_dict().items())
    with pytest.raises(AssertionError, match="trained again"):  # another lr: another file
        studies.train_from_own_inits(
            _mlp, data, [3, 4], cache=tmp_path, key="toy", **(OPTIONS | {"lr": 0.2})
        )


def test_training_refuses_a_keyless_cache_and_mismatched_seeds(tmp_path):
    with pytest.raises(ValueError, match="key"):
        studies.train_from_own_inits(_mlp, _client_data(), [0, 1], cache=tmp_path, **OPTIONS)
    with pytest.raises(ValueError, match="2 datasets for 1 init seeds"):
        studies.train_from_own_inits(_mlp, _client_data(), [0], **OPTIONS)


# ---- weight matching, baselines ----------------------------------------------------------------


def test_weight_matched_undoes_a_planted_permutation():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[16, 16])
    spec = permutation_spec(model)
    permuted = apply_permutation(
        spec, random_permutation(spec, torch.Generator().manual_seed(2)), model.state_dict()
    )
    assert not torch.equal(permuted["layers.0.weight"], model.state_dict()["layers.0.weight"])
    recovered = studies.weight_matched(spec, model.state_dict(), permuted)
    for k, v in model.state_dict().items():
        assert torch.equal(recovered[k], v)


def test_baseline_rows_are_local_mean_best_and_the_summed_softmax_ensemble():
    torch.manual_seed(0)
    X, y = _data(n=300, d=6)
    models = [nn.Linear(6, 3) for _ in range(3)]
    local, rows = studies.baseline_rows(models, X, y)
    assert local == [evaluate(m, X, y)[1] for m in models]
    assert rows["local (mean)"] == pytest.approx(sum(local) / 3)
    assert rows["local (best)"] == max(local)
    votes = sum(F.softmax(predict_logits(m, X), 1) for m in models).argmax(1)
    assert rows["prediction ensemble"] == pytest.approx((votes == y).float().mean().item())
    _, same = studies.baseline_rows([models[0], models[0]], X, y)
    assert same["prediction ensemble"] == pytest.approx(local[0])


# ---- data and results files --------------------------------------------------------------------


def test_npz_images_are_scaled_when_uint8_and_labels_made_int64(tmp_path):
    g = np.random.default_rng(0)
    raw = g.integers(0, 256, (5, 1, 2, 2)).astype(np.uint8)
    floats = g.random((3, 1, 2, 2)).astype(np.float32)
    np.savez(
        tmp_path / "d.npz",
        X_train=raw,
        y_train=np.array([0, 1, 2, 3, 4], np.int32),
        X_test=floats,
        y_test=np.array([1, 2, 3], np.uint8),
    )
    X, y, X_test, y_test = studies.load_fashion_mnist(tmp_path / "d.npz")
    assert X.dtype == torch.float32 and torch.equal(X, torch.as_tensor(raw).float() / 255)
    assert torch.equal(X_test, torch.as_tensor(floats))
    assert y.dtype == y_test.dtype == torch.int64 and y_test.tolist() == [1, 2, 3]


def test_write_json_creates_folders_and_writes_numpy_scalars_as_numbers(tmp_path):
    path = tmp_path / "a" / "b.json"
    studies.write_json(path, {"x": np.float32(0.5), "rows": [1, 2]})
    assert path.read_text().endswith("}\n")
    assert json.loads(path.read_text()) == {"x": 0.5, "rows": [1, 2]}
