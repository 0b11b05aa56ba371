"""The local optimizers a client trains with: ``torch.optim``'s SGD and Adam, stepped through
torch's own functional kernels (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``), so each
update is ``torch.optim.SGD``'s or ``torch.optim.Adam``'s, bit for bit.

Why not the ``torch.optim`` classes themselves: their methods are wrapped to keep
``torch.compile`` out, and the wrapper imports ``torch._dynamo`` when an optimizer is first built.
That import is 1.1 s of CPU in every process that trains, as much as importing torch: each Ray
worker of a simulation pays it before its first client (benchmarks.md, issue 27). A client's
local training needs none of what the classes add (parameter groups, hooks, state dicts): one
group, ``zero_grad`` and ``step``. A user's own optimizer registered in ``OPTIMIZERS`` may still
be any ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd


class LocalOptimizer(Protocol):
    """What local training calls on an optimizer (``torch.optim.Optimizer`` has both)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...


class _Params:
    """One parameter group and the per-parameter state of its lazily started update rule."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().requires_grad_(False).zero_()

    def with_grad(self) -> list[int]:
        """The indices of the parameters that got a gradient (``torch.optim`` skips the others,
        and starts their state only once they get one)."""
        return [i for i, p in enumerate(self.params) if p.grad is not None]


class SGD(_Params):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        live = self.with_grad()
        params = [self.params[i] for i in live]
        buffers = [self.buffers[i] for i in live]
        sgd(
            params,
            [p.grad for p in params],
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        if self.momentum != 0:  # the kernel started the buffers it was handed as None
            for i, buffer in zip(live, buffers, strict=True):
                self.buffers[i] = buffer


class Adam(_Params):
    """``torch.optim.Adam(params, lr, weight_decay=weight_decay)``: betas (0.9, 0.999), eps 1e-8."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params)
        self.lr, self.weight_decay = lr, weight_decay
        # per parameter: its step count (a CPU scalar, as torch.optim keeps it), first and
        # second moments; None until its first gradient
        self.state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(
            self.params
        )

    @torch.no_grad()
    def step(self) -> None:
        live = self.with_grad()
        if not live:
            return
        for i in live:
            if self.state[i] is None:
                p = self.params[i]
                self.state[i] = (
                    torch.tensor(0.0, dtype=torch.get_default_dtype()),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                )
        params = [self.params[i] for i in live]
        steps, first, second = zip(*(self.state[i] for i in live), strict=True)
        adam(
            params,
            [p.grad for p in params],
            list(first),
            list(second),
            [],
            list(steps),
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=self.BETAS[0],
            beta2=self.BETAS[1],
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.EPS,
            maximize=False,
        )
