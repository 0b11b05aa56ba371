"""Checks of client updates before they reach any aggregation rule.

A malformed update (missing or extra keys, wrong shapes or dtypes, NaN/Inf) is rejected with a
reason; it never reaches the fused model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedalign.algorithms.stats import (
    STATISTICS,
    client_statistics,
    flatten,
    received_statistics,
)


def update_problem(
    reference: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` cannot be fused with models shaped like ``reference``, or None if it can.

    ``max_norm`` bounds the L2 norm of the change ``update - reference`` over floating-point
    entries: a client whose update is far larger than any honest one is rejected.
    """
    return update_problems([reference], [update], [max_norm])[0]


def update_problems(
    references: Sequence[Mapping[str, torch.Tensor]],
    updates: Sequence[Mapping[str, torch.Tensor]],
    max_norms: Sequence[float | None],
) -> list[str | None]:
    """``update_problem`` of each ``(reference, update, max_norm)`` (``update_checks``)."""
    return update_checks(references, updates, max_norms)[0]


def update_checks(
    references: Sequence[Mapping[str, torch.Tensor]],
    updates: Sequence[Mapping[str, torch.Tensor]],
    max_norms: Sequence[float | None],
    measured: Sequence[bool] | None = None,
) -> tuple[list[str | None], list[float | None]]:
    """``update_problem`` of each ``(reference, update, max_norm)``, with the tensor checks of all
    updates batched: one ``torch._foreach_norm`` call gives every floating-point tensor's norm (a
    NaN or Inf makes it non-finite) and one the norms of the changes ``update - reference``.

    Also returns those change norms: of every structurally sound, finite update that has a
    ``max_norm`` or is ``measured`` (None for the others), so that a later comparison of the
    clients' norms (``update_outliers``) does not compute them a second time.

    Checking tensor by tensor costs a few torch calls per tensor, and each call releases the GIL
    and waits to take it back from the simulation's polling threads in the driver: 100 updates of
    the quickstart's MLP took 5-10 s that way beside one busy Python thread, 0.03 s batched. A
    norm that is not finite although its entries are (it overflowed) is re-checked entry by entry.
    """
    problems = [_structure_problem(r, u) for r, u in zip(references, updates, strict=True)]
    sound = [i for i, problem in enumerate(problems) if problem is None]
    owners, tensors = _floats({i: updates[i] for i in sound})
    for i in {i for i, n in zip(owners, _norms(tensors), strict=True) if not math.isfinite(n)}:
        problems[i] = _nonfinite_problem(updates[i])
    wanted = [
        i
        for i in sound
        if problems[i] is None and (max_norms[i] is not None or (measured and measured[i]))
    ]
    norms: list[float | None] = [None] * len(updates)
    for i, norm in zip(
        wanted,
        change_norms([references[i] for i in wanted], [updates[i] for i in wanted]),
        strict=True,
    ):
        norms[i] = norm
        if max_norms[i] is not None and norm > max_norms[i]:
            problems[i] = f"update norm {norm:.4g} exceeds max_update_norm={max_norms[i]:g}"
    return problems, norms


def change_norms(
    references: Sequence[Mapping[str, torch.Tensor]],
    updates: Sequence[Mapping[str, torch.Tensor]],
) -> list[float]:
    """The L2 norm of each ``update - reference`` over the floating-point entries (structurally
    sound updates), every tensor's difference and norm in one batched call."""
    pairs = [
        (i, k) for i, ref in enumerate(references) for k, r in ref.items() if r.is_floating_point()
    ]
    changes = (
        torch._foreach_sub([updates[i][k] for i, k in pairs], [references[i][k] for i, k in pairs])
        if pairs
        else []
    )
    squares = [0.0] * len(references)
    for (i, _), n in zip(pairs, _norms(changes), strict=True):
        squares[i] += n * n
    return [v**0.5 for v in squares]


def _structure_problem(
    reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> str | None:
    """Missing or extra keys, or a tensor of another shape or dtype than the reference's."""
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
    return None


def _nonfinite_problem(update: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor holding a NaN or Inf, checked entry by entry."""
    for key, value in update.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key}: contains NaN or Inf"
    return None


def _floats(
    states: Mapping[int, Mapping[str, torch.Tensor]],
) -> tuple[list[int], list[torch.Tensor]]:
    """The floating-point tensors of ``states``, each with the key of the state it belongs to."""
    owners, tensors = [], []
    for i, state in states.items():
        for value in state.values():
            if value.is_floating_point():
                owners.append(i)
                tensors.append(value)
    return owners, tensors


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """Each tensor's L2 norm, computed in float64, in one call."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).tolist()


def fused_problem(
    fused: Mapping[str, torch.Tensor],
    inputs: list[Mapping[str, torch.Tensor]],
    max_ratio: float | None,
) -> str | None:
    """Why a fused model must not be broadcast: a non-finite entry, or (``max_ratio``) an L2
    norm more than ``max_ratio`` times the median of the ``inputs``' (the previous global model
    and the validated updates). The median, not the largest: a client's oversized update would
    otherwise raise the bound it is checked against. The norms of all the inputs' tensors are
    computed in one call (``update_problems`` says why)."""
    for key, value in fused.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"fused model: {key} contains NaN or Inf"
    if max_ratio is None:
        return None
    owners, tensors = _floats(dict(enumerate([fused, *inputs])))
    squares = [0.0] * (len(inputs) + 1)
    for i, n in zip(owners, _norms(tensors), strict=True):
        squares[i] += n * n
    norm = squares[0] ** 0.5
    bound = max_ratio * float(torch.tensor(squares[1:], dtype=torch.float64).sqrt().median())
    if norm > bound:
        return (
            f"fused model norm {norm:.4g} exceeds max_fused_ratio={max_ratio:g} times the "
            f"median input norm"
        )
    return None


# ---- client statistics ---------------------------------------------------------------------------
#
# Every statistic a client sends is checked before any rule reads it, by the check its producer
# declares beside it (``STATISTICS.register(kind, compute, check=..., scale=...)``): the helpers
# below are what those checks share. A check returns why the values are unusable, or None.

SYMMETRY_TOLERANCE = 1e-6
"""Largest ``|G - G^T|`` of a Gram relative to its largest entry (float64 sums are symmetric to
rounding, far below this)."""
PSD_JITTER = 1e-6
"""A Gram is positive semi-definite within tolerance when ``G + jitter * mean(diag G) * I`` has a
Cholesky factor (rounding makes an honest singular Gram's least eigenvalues slightly negative)."""


def finite_problem(name: str, value: object) -> str | None:
    """``value`` must be a floating-point tensor without NaN or Inf."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"{name}: not a floating-point tensor"
    if not torch.isfinite(value).all():
        return f"{name}: contains NaN or Inf"
    return None


def count_problem(name: str, count: object, examples: int | None) -> str | None:
    """A statistic's row count must be a whole positive multiple of the examples it was computed
    on (one row per example, or per example and position: a conv's positions, a sequence's steps):
    a count that is not says the sums were scaled or come from other data. ``None`` examples
    (unknown, offline): a finite count of at least one row."""
    if (problem := finite_problem(name, count)) is not None:
        return problem
    if count.numel() != 1:
        return f"{name}: a count must be one number, got shape {tuple(count.shape)}"
    value = float(count)
    if examples is None:
        return None if value >= 1 else f"{name}: count {value:g} is less than one row"
    rows_per_example = value / max(examples, 1)
    if value < 1 or abs(rows_per_example - round(rows_per_example)) > 1e-6 * rows_per_example:
        return f"{name}: count {value:g} is not a positive multiple of its {examples} examples"
    return None


def gram_problem(
    name: str, gram: object, sizes: tuple[int, ...], examples: int | None
) -> str | None:
    """A Gram from ``stats.gram_matrices``: square of one of ``sizes``, finite, symmetric and
    positive semi-definite within tolerance, its constant column's diagonal entry a count
    consistent with ``examples``."""
    if (problem := finite_problem(name, gram)) is not None:
        return problem
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] not in sizes:
        return f"{name}: shape {tuple(gram.shape)}, expected a square of size {sizes}"
    G = gram.double()
    scale = float(G.abs().max())
    if float((G - G.T).abs().max()) > SYMMETRY_TOLERANCE * scale:
        return f"{name}: not symmetric"
    jitter = PSD_JITTER * float(torch.diagonal(G).abs().mean()) + 1e-12
    if int(torch.linalg.cholesky_ex(G + jitter * torch.eye(len(G), dtype=G.dtype)).info) != 0:
        return f"{name}: not positive semi-definite"
    return count_problem(f"{name} count", G[-1, -1], examples)


def nonnegative_problem(name: str, value: object, shape: tuple[int, ...]) -> str | None:
    """A finite, non-negative tensor of ``shape`` (a Fisher, sums of squares)."""
    if (problem := finite_problem(name, value)) is not None:
        return problem
    if tuple(value.shape) != shape:
        return f"{name}: shape {tuple(value.shape)}, expected {shape}"
    if (value < 0).any():
        return f"{name}: negative entries"
    return None


def moments_problem(name: str, moments: object, channels: int, examples: int | None) -> str | None:
    """Count, sum and sum of squares of ``channels`` channels (``stats.activation_moments``):
    finite, the squares non-negative, a variance that is not negative, a consistent count."""
    if not isinstance(moments, Mapping) or set(moments) != {"count", "sum", "sumsq"}:
        return f"{name}: expected count, sum and sumsq"
    if (problem := count_problem(f"{name} count", moments["count"], examples)) is not None:
        return problem
    if (problem := finite_problem(f"{name} sum", moments["sum"])) is not None:
        return problem
    if tuple(moments["sum"].shape) != (channels,):
        return f"{name} sum: shape {tuple(moments['sum'].shape)}, expected ({channels},)"
    sumsq = moments["sumsq"]
    if (problem := nonnegative_problem(f"{name} sumsq", sumsq, (channels,))) is not None:
        return problem
    n = float(moments["count"])
    mean = moments["sum"].double() / n
    if ((sumsq.double() / n - mean**2) < -1e-6 * (sumsq.double() / n + 1e-12)).any():
        return f"{name}: negative variance"
    return None


def cross_problem(
    name: str, cross: object, sizes: tuple[int | None, int | None], examples: int | None
) -> str | None:
    """Sums relating two models' activations (``stats.cross_sums``): finite, consistent shapes
    (``sizes``: the reference's and the model's units where known), non-negative squares, the
    cross sums within Cauchy-Schwarz of the squares, a consistent count."""
    keys = {"count", "sum_ref", "sum", "sq_ref", "sq", "cross"}
    if not isinstance(cross, Mapping) or set(cross) != keys:
        return f"{name}: expected {', '.join(sorted(keys))}"
    if (problem := count_problem(f"{name} count", cross["count"], examples)) is not None:
        return problem
    for key in ("sum_ref", "sum", "cross"):
        if (problem := finite_problem(f"{name} {key}", cross[key])) is not None:
            return problem
    d_ref, d = (known or len(cross[key]) for known, key in zip(sizes, ("sum_ref", "sum")))
    for key, shape in (("sum_ref", (d_ref,)), ("sum", (d,)), ("cross", (d_ref, d))):
        if tuple(cross[key].shape) != shape:
            return f"{name} {key}: shape {tuple(cross[key].shape)}, expected {shape}"
    for key, shape in (("sq_ref", (d_ref,)), ("sq", (d,))):
        if (problem := nonnegative_problem(f"{name} {key}", cross[key], shape)) is not None:
            return problem
    bound = torch.outer(cross["sq_ref"].double(), cross["sq"].double()).sqrt()
    if (cross["cross"].double().abs() > bound * (1 + 1e-6) + 1e-9).any():
        return f"{name}: cross sums exceed what the squares allow"
    return None


def statistics_problem(
    stats: Mapping[str, object],
    state: Mapping[str, torch.Tensor],
    examples: int | None,
    rows: Mapping[str, Mapping[str, float]] | None = None,
) -> str | None:
    """Why a client's statistics (kind -> values) are unusable with a model shaped like
    ``state``, computed on ``examples`` examples (None: they are usable), by each kind's
    registered check; a kind registered without one must at least be finite tensors. ``None``
    examples (offline fusion, where weights need not be counts) skips the count checks.

    ``rows`` (``rows_per_example``): per kind with a registered ``count``, the rows each part
    holds per example for this model. A count must then be exactly ``rows * examples``: a
    whole multiple is not enough, since a client that scales a Gram and its count by 1e12 keeps
    both its per-row scale and the multiple, and would own RegMean's solve."""
    for kind, values in stats.items():
        if kind not in STATISTICS:
            return f"unknown statistic {kind!r}"
        entry = STATISTICS.get(kind)
        check = entry.meta.get("check")
        if check is None:
            problems = (
                finite_problem(f"{kind}/{k}", v)
                for k, v in flatten(values if isinstance(values, Mapping) else {"": values}).items()
            )
            problem = next((p for p in problems if p is not None), None)
        else:
            try:
                problem = check(values, state, examples)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                problem = f"malformed: {exc!r}"
        if problem is None and examples is not None and rows and kind in rows:
            problem = _rows_problem(entry.meta["count"](values), rows[kind], examples)
        if problem is not None:
            return f"{kind}: {problem}"
    return None


def _rows_problem(
    counts: Mapping[str, torch.Tensor], expected: Mapping[str, float], examples: int
) -> str | None:
    """A part whose count is not ``rows * examples`` for the rows the model gives per example."""
    for part, count in counts.items():
        if part not in expected:
            continue
        want = expected[part] * examples
        if abs(float(count) - want) > 1e-6 * want:
            return (
                f"{part} count {float(count):.6g} is {float(count) / examples:.6g} rows per "
                f"example; the model gives {expected[part]:g} (a count-scaled statistic)"
            )
    return None


def rows_per_example(
    kinds: Sequence[str],
    model: torch.nn.Module,
    example: tuple[torch.Tensor, torch.Tensor],
    options: Mapping[str, object] | None = None,
) -> dict[str, dict[str, float]]:
    """Per statistic kind with a registered ``count``, the rows each part holds per example of
    this model, measured by computing the statistic on one example (``example``: one input and
    its label) the way a client does: what every honest client's counts are multiples of."""
    counted = [k for k in kinds if STATISTICS.get(k).meta.get("count") is not None]
    if not counted:
        return {}
    sent = client_statistics(counted, model, *example, options=options)
    state = model.state_dict()
    decoded = received_statistics(sent, state)
    return {
        k: {part: float(c) for part, c in STATISTICS.get(k).meta["count"](decoded[k]).items()}
        for k in counted
    }


def received_problem(
    stats: Mapping[str, object],
    state: Mapping[str, torch.Tensor],
    examples: int | None,
    rows: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[dict[str, object], str | None]:
    """A client's statistics as sent, read the way the server uses them: decoded from their
    compact forms (``stats.received_statistics``) and checked (``statistics_problem``). Returns
    ``(decoded, None)``, or ``({}, reason)`` when they are unusable."""
    try:
        decoded = received_statistics(stats, state)
    except ValueError as exc:
        return {}, str(exc)
    problem = statistics_problem(decoded, state, examples, rows)
    return ({}, problem) if problem is not None else (decoded, None)


def above_others(values: Sequence[float], max_ratio: float) -> list[tuple[int, float]]:
    """``(index, median)`` of each value above ``max_ratio`` times the median of the *other*
    values: one attacker among honest clients cannot move the median it is compared with."""
    n = len(values)
    if n < 2:
        return []
    tensor = torch.tensor(values, dtype=torch.float64)
    others = tensor.expand(n, n)[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    medians = others.median(dim=1).values  # row j: the median of every value but the j-th
    above = (medians > 0) & (tensor > max_ratio * medians)
    return [(j, float(medians[j])) for j in above.nonzero().flatten().tolist()]


def update_outliers(norms: Sequence[float], max_ratio: float | None) -> dict[int, str]:
    """Updates whose change from the model they were sent is far larger than the other clients'
    (``strategy.max_update_ratio``): on by default, so that a client scaling its update by 1e6
    is dropped and recorded whatever rule fuses, without an absolute bound to tune per model.
    Index -> reason."""
    if max_ratio is None or len(norms) < 2:
        return {}
    return {
        j: (
            f"update norm {norms[j]:.4g}, more than max_update_ratio={max_ratio:g} times the "
            f"other clients' median {median:.4g}"
        )
        for j, median in above_others(norms, max_ratio)
    }


def scale_outliers(stats: list[Mapping[str, object]], max_ratio: float | None) -> dict[int, str]:
    """Clients whose statistics are far larger than the others': per kind with a registered
    ``scale`` (values -> {part: magnitude per row}), a client whose magnitude of a part exceeds
    ``max_ratio`` times the median of the *other* clients' (``above_others``). Index -> reason."""
    if max_ratio is None or len(stats) < 2:
        return {}
    found: dict[int, str] = {}
    kinds = set.intersection(*(set(s) for s in stats))
    for kind in sorted(kinds):
        scale = STATISTICS.get(kind).meta.get("scale") if kind in STATISTICS else None
        if scale is None:
            continue
        magnitudes = [scale(s[kind]) for s in stats]
        for part in sorted(set.intersection(*(set(m) for m in magnitudes))):
            values = [float(m[part]) for m in magnitudes]
            for j, median in above_others(values, max_ratio):
                found.setdefault(
                    j,
                    f"{kind}/{part}: {values[j]:.3g} per row, more than "
                    f"max_stat_ratio={max_ratio:g} times the other clients' median {median:.3g}",
                )
    return found
