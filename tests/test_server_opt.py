"""Server optimizers (``fedalign.algorithms.server_opt``) and the strategy catalogue's
configuration: the step's own rules (identity, reset), its state through a checkpoint, and one-line
rejection of invalid parameters. The equality with Flower's FedAvgM/FedAdam/FedYogi/FedAdagrad is in
``tests/fl/test_flower_strategies.py``."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedalign.algorithms.server_opt import SERVER_OPTIMIZERS, server_step
from fedalign.cli import main
from fedalign.config.load import from_dict
from fedalign.core.errors import ConfigError
from tests.helpers import ROOT


def states(width: int = 3) -> tuple[OrderedDict, OrderedDict]:
    g = torch.Generator().manual_seed(width)
    reference = OrderedDict(w=torch.randn(width, 2, generator=g), n=torch.tensor(4))
    fused = OrderedDict(w=torch.randn(width, 2, generator=g), n=torch.tensor(5))
    return reference, fused


@pytest.mark.parametrize("name", list(SERVER_OPTIMIZERS))
def test_every_optimizer_steps_from_the_global_model_and_keeps_integer_buffers(name: str) -> None:
    reference, fused = states()
    options = {} if name == "sgd" else {"lr": 0.5}
    new, state, what = server_step(name, options, reference, fused, {})
    assert what == "kept" and list(new) == ["w", "n"]
    assert torch.equal(new["n"], fused["n"])  # a counter is the fused model's
    if name == "sgd":  # lr 1 is the fused model itself
        assert new["w"] is fused["w"] and state == {}
    else:  # a step towards the fused model, not onto it
        assert not torch.equal(new["w"], fused["w"])
        assert (new["w"] - reference["w"]).mul(fused["w"] - reference["w"]).sum() > 0
        assert int(state["step"]) == 1
        _, state2, _ = server_step(name, options, new, fused, state)
        assert int(state2["step"]) == 2


def test_adam_second_step_uses_its_moments() -> None:
    """Hand-computed FedAdam: two steps with bias correction at t + 1, as Flower does."""
    ref = OrderedDict(w=torch.tensor([0.0]))
    fused = OrderedDict(w=torch.tensor([1.0]))
    options = {"lr": 0.1, "betas": [0.5, 0.75], "tau": 0.0}
    one, state, _ = server_step("adam", options, ref, fused, {})
    m, v = 0.5 * 1.0, 0.25 * 1.0
    eta = 0.1 * (1 - 0.75**2) ** 0.5 / (1 - 0.5**2)
    assert one["w"].item() == pytest.approx(eta * m / v**0.5)
    two, _, _ = server_step("adam", options, one, fused, state)
    d = 1.0 - one["w"].item()
    m, v = 0.5 * m + 0.5 * d, 0.75 * v + 0.25 * d**2
    eta = 0.1 * (1 - 0.75**3) ** 0.5 / (1 - 0.5**3)
    assert two["w"].item() == pytest.approx(one["w"].item() + eta * m / v**0.5)


def test_fedavgm_defaults_to_flowers_momentum_0_and_accumulates_when_set() -> None:
    """Flower's ``FedAvgM`` defaults to server momentum 0: a config naming only ``momentum`` takes
    plain server steps of size ``lr``, as ``sgd`` does. With momentum set, hand-computed: the
    buffer is the first pseudo-gradient, then ``beta b + g``."""
    ref = OrderedDict(w=torch.tensor([0.0]))
    fused = OrderedDict(w=torch.tensor([1.0]))
    assert from_dict({"server_optimizer": {"name": "momentum"}}).server_optimizer.options == {
        "lr": 1.0,
        "momentum": 0.0,
    }
    state: dict = {}
    current = ref
    for _ in range(3):  # no memory: each step is sgd's
        stepped, state, _ = server_step("momentum", {"lr": 0.5}, current, fused, state)
        plain, _, _ = server_step("sgd", {"lr": 0.5}, current, fused, {})
        assert torch.equal(stepped["w"], plain["w"])
        current = stepped
    one, state, _ = server_step("momentum", {"lr": 0.5, "momentum": 0.9}, ref, fused, {})
    assert one["w"].item() == pytest.approx(0.5)  # b = g = -1
    two, _, _ = server_step("momentum", {"lr": 0.5, "momentum": 0.9}, one, fused, state)
    assert two["w"].item() == pytest.approx(0.5 + 0.5 * (0.9 * 1.0 + 0.5))  # b = 0.9 (-1) - 0.5


def test_changed_widths_or_an_unrelated_basis_reset_the_state() -> None:
    reference, _ = states(3)
    _, wider = states(5)
    _, state, _ = server_step("adam", {}, *states(3), {})
    new, after, what = server_step("adam", {}, reference, wider, state)
    assert what == "reset (widths changed)" and after == {} and new["w"] is wider["w"]
    new, after, what = server_step("adam", {}, *states(3), state, keeps_basis=False)
    assert what == "reset (clients trained from their own inits)" and after == {}


def test_the_resolved_config_records_the_optimizer_options() -> None:
    cfg = from_dict({"server_optimizer": {"name": "adam", "lr": 0.05}})
    assert cfg.server_optimizer.options == {
        "lr": 0.05,
        "betas": [0.9, 0.99],
        "tau": 1e-3,
        "bias_correction": True,
    }
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server_optimizer": {"name": "lamb"}}, "server_optimizer.name: unknown server optimizer"),
        ({"server_optimizer": {"name": "adam", "lr": -1}}, "lr must be a number > 0"),
        ({"server_optimizer": {"name": "adam", "betas": [0.9]}}, "betas must be two numbers"),
        ({"server_optimizer": {"name": "yogi", "tau": 0}}, "tau must be a number > 0"),
        ({"server_optimizer": {"name": "momentum", "momentum": 1.5}}, "momentum must be in"),
        (
            {"server_optimizer": {"name": "sgd", "betas": [0.9, 0.9]}},
            "unknown key 'server_optimizer.betas': not an option of sgd",
        ),
        ({"aggregation": {"fuse": "trimmed-mean", "beta": 0.5}}, "beta .* must be in \\[0, 0.5\\)"),
        (
            {"data": {"num_clients": 4}, "aggregation": {"fuse": "bulyan", "num_byzantine": 1}},
            "bulyan with num_byzantine=1 needs at least 7 clients a round, a round samples 4",
        ),
        ({"aggregation": {"fuse": "krum", "num_byzantine": -1}}, "num_byzantine must be an int"),
        (
            {"aggregation": {"fuse": "bulyan", "selection": "greedy"}},
            "aggregation.selection: expected one of 'recursive', 'one-shot', got 'greedy'",
        ),
        (
            {"strategy": {"name": "pfnm"}, "aggregation": {"fuse": "median"}},
            "the align/fuse/repair pipeline runs with strategy",
        ),
    ],
)
def test_invalid_parameters_are_one_config_error(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


def test_cli_rejects_an_invalid_server_optimizer_with_one_line_exit_2(capsys) -> None:
    code = main(["run", str(ROOT / "configs/digits_mlp.yaml"), "--set", "server_optimizer.lr=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and "server_optimizer: sgd: lr must be a number > 0" in err


def test_a_registered_server_optimizer_is_a_config_choice() -> None:
    """A user's rule (here: a step of a fixed size 0.5, as ``sgd`` with ``lr: 0.5``) is checked
    like the built-ins and runs as they do."""
    import fedalign

    def half(reference, fused, state, *, lr: float = 0.5):
        return server_step("sgd", {"lr": lr}, reference, fused, state)[:2]

    fedalign.register_server_optimizer("half-step", half)
    try:
        cfg = from_dict({"server_optimizer": {"name": "half-step"}})
        assert cfg.server_optimizer.options == {"lr": 0.5}
        with pytest.raises(ConfigError, match="lr must be a number > 0"):
            from_dict({"server_optimizer": {"name": "half-step", "lr": -2}})
        reference, fused = states()
        new, _, _ = server_step("half-step", {}, reference, fused, {})
        torch.testing.assert_close(new["w"], (reference["w"] + fused["w"]) / 2)
    finally:
        SERVER_OPTIMIZERS.unregister("half-step")
