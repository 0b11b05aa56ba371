"""Checks of client updates before they reach any aggregation rule.

A malformed update (missing or extra keys, wrong shapes or dtypes, NaN/Inf) is rejected with a
reason; it never reaches the fused model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def update_problem(
    reference: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` cannot be fused with models shaped like ``reference``, or None if it can.

    ``max_norm`` bounds the L2 norm of the change ``update - reference`` over floating-point
    entries: a client whose update is far larger than any honest one is rejected.
    """
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}"
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: contains NaN or Inf"
    if max_norm is not None:
        squares = sum(
            float(((update[k].double() - ref.double()) ** 2).sum())
            for k, ref in reference.items()
            if ref.is_floating_point()
        )
        if squares**0.5 > max_norm:
            return f"update norm {squares**0.5:.4g} exceeds max_update_norm={max_norm:g}"
    return None
