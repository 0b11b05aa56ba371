"""fedalign's local optimizers (``fedalign.client.optim``) step as ``torch.optim``'s classes do,
bit for bit (that they leave ``torch._dynamo`` unimported, why they exist, is
``tests/test_worker_imports.py``'s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedalign.client.optim import SGD, Adam
from fedalign.client.training import make_optimizer

Make = Callable[[list[torch.Tensor]], object]


def trained(make: Make, steps: int = 6) -> list[torch.Tensor]:
    """A small net after ``steps`` steps of ``make``'s optimizer; its last layer gets no gradient
    in the first two steps (``torch.optim`` skips it and starts its state on its first gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))
    opt = make(list(net.parameters()))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(8, 5)
        out = net[:3](x) if step < 2 else net(x)
        out.pow(2).sum().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize(
    ("ours", "torchs"),
    [
        (
            lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        ),
        (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            lambda p: Adam(p, lr=0.01, weight_decay=1e-3),
            lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
        ),
    ],
    ids=["sgd-momentum-decay", "sgd", "adam-decay"],
)
def test_the_local_optimizers_step_as_torch_optim_does(ours: Make, torchs: Make) -> None:
    mine, theirs = trained(ours), trained(torchs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(mine, trained(lambda p: SGD(p, lr=0.0))))


def test_zero_grad_clears_or_zeroes_the_gradients() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = make_optimizer([w], "sgd", lr=0.1)
    w.sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros(3))
    opt.zero_grad()
    assert w.grad is None
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
