"""How a client's Grams travel to the server, and how the server reads them back.

A full input Gram of an MLP's first layer (785 x 785 for Fashion-MNIST) is 7.8 times the values of
the whole 784-100-10 model, so a round with Grams cost 4.9x FedAvg's bytes (docs/fidelity.md).
Two compact forms, chosen per layer by the client:

- ``{"triangle": t}``: the upper triangle, row by row (a Gram is symmetric: half the values, exact);
- ``{"factor": F, "diagonal": d}``: when even the triangle holds more than ``budget`` values per
  value of the layer's weight, the eigenvectors of the largest eigenvalues scaled by their square
  roots (``F F^T`` is the best approximation of that rank) and the exact diagonal. The server adds
  what the factor misses on the diagonal, so the count (the constant column's diagonal entry) and
  every input's energy stay exact and the reconstruction is positive semi-definite; the rank is the
  largest whose factor and diagonal fit the budget (0: the diagonal alone).

With ``budget`` b, a layer's Gram costs at most b times its weight's values (or its diagonal, when
even that is more), so a round with Grams costs at most ``1 + b/2`` FedAvg rounds of bytes (the
clients also download the model).

The server must not trust the sizes a client sends: ``unpack`` checks them against the layer (the
model the server holds) before building anything, so a client cannot make it allocate a matrix
larger than the layer's own Gram, and names the problem in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Packed = dict[str, torch.Tensor]


def upper_triangle(gram: torch.Tensor) -> torch.Tensor:
    """The entries on and above the diagonal, row by row."""
    rows, cols = torch.triu_indices(len(gram), len(gram))
    return gram[rows, cols]


def pack(gram: torch.Tensor, weight_values: int, budget: float | None) -> Packed:
    """``gram`` (float64, symmetric PSD) in its compact form for a layer whose weight holds
    ``weight_values`` values; ``budget`` None: always the exact triangle. Sent in float32."""
    n = len(gram)
    if budget is None or n * (n + 1) // 2 <= budget * weight_values:
        return {"triangle": upper_triangle(gram).float()}
    rank = min(max(0, int(budget * weight_values) // n - 1), n - 1)
    eigenvalues, vectors = torch.linalg.eigh(gram.double())  # ascending
    factor = vectors[:, n - rank :] * eigenvalues[n - rank :].clamp_min(0.0).sqrt()
    return {"factor": factor.float(), "diagonal": torch.diagonal(gram).float()}


def _size_problem(name: str, n: int, sizes: tuple[int, ...]) -> str | None:
    if n in sizes:
        return None
    return f"{name}: shape ({n}, {n}), expected a square of size {sizes}"


def unpack(name: str, packed: object, sizes: tuple[int, ...]) -> torch.Tensor:
    """The Gram a client sent in ``pack``'s form, for a layer whose Gram has one of ``sizes``
    (full, or a conv's channel Gram). Raises ValueError naming the problem (the form, a size that
    is not the layer's, a factor of full rank); the values themselves (finite, PSD, the count) are
    checked afterwards on the Gram (``algorithms.checks.gram_problem``)."""
    if not isinstance(packed, Mapping) or set(packed) not in ({"triangle"}, {"factor", "diagonal"}):
        found = sorted(packed) if isinstance(packed, Mapping) else type(packed).__name__
        raise ValueError(f"{name}: expected a triangle, or a factor and a diagonal, got {found}")
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in packed.values()):
        raise ValueError(f"{name}: expected floating-point tensors")
    if "triangle" in packed:
        values = packed["triangle"]
        length = values.numel()
        n = (math.isqrt(8 * length + 1) - 1) // 2
        if values.dim() != 1 or n * (n + 1) // 2 != length or n == 0:
            raise ValueError(f"{name}: {tuple(values.shape)} values are no square's upper triangle")
        if (problem := _size_problem(name, n, sizes)) is not None:
            raise ValueError(problem)
        rows, cols = torch.triu_indices(n, n)
        gram = torch.zeros(n, n, dtype=values.dtype)
        gram[rows, cols] = values
        gram[cols, rows] = values
        return gram
    factor, diagonal = packed["factor"], packed["diagonal"]
    if factor.dim() != 2 or diagonal.dim() != 1 or len(factor) != len(diagonal):
        raise ValueError(
            f"{name}: factor {tuple(factor.shape)} and diagonal {tuple(diagonal.shape)} "
            "do not fit one Gram"
        )
    n, rank = factor.shape
    if (problem := _size_problem(name, n, sizes)) is not None:
        raise ValueError(problem)
    if rank >= n:
        raise ValueError(f"{name}: factor of rank {rank} for a Gram of size {n}")
    F = factor.double()
    gram = F @ F.T
    missing = (diagonal.double() - torch.diagonal(gram)).clamp_min(0.0)
    return gram + torch.diag_embed(missing)
