"""Aggregation rules for LoRA adapters: how the server combines the clients' low-rank updates.

A LoRA layer computes ``W0 x + (alpha / r) B A x`` with ``A: r x in`` and ``B: out x r``, so a
client's weight change is ``delta W_i = (alpha / r_i) B_i A_i``. ``alpha=None`` means no scaling
(``delta W = B A``, as if ``alpha = r``). The exact federated update is the weighted mean of the
clients' changes, ``sum p_i delta W_i``; averaging A and B separately (FedIT) gives the product of
the means instead, which differs. The rules here are the field's answers to that gap, plus one that
uses the symmetry this project is about: ``B A = (B R)(R^T A)`` for any orthogonal ``R`` on the
rank axis (a permutation, with signs, in particular), so clients whose rank components are the
same directions in a different order can be matched before A and B are averaged.

Every rule is ``rule(clients, weights, **options) -> LayerUpdate`` for one layer: ``clients``
are :class:`Adapter` s in float64 with their scales, ``weights`` sum to one. A rule's options are
its keyword-only parameters (their defaults and annotations are the registry's, as for every
algorithm). :func:`lora_aggregate` runs a rule on every layer of per-client ``{layer: (A, B)}``
mappings after checking them; :func:`lora_update` keeps only the weight change, so the rules can
be compared offline on the same adapters.

What the server's model and the clients receive (:class:`LayerUpdate`):

- the server's model after the round is ``W0 + delta`` (``delta`` is what :func:`lora_update`
  returns, in weight units: ``alpha / r`` already applied);
- client ``i`` continues from ``W0 + base + (alpha / r') B' A'`` with ``(A', B')`` its entry of
  ``personal`` when the rule keeps per-client adapters, else the global ``adapter``; no adapter
  at all means fresh adapters (initialised by the client, as FLoRA does after folding).

Returned adapters follow the same convention at their own rank ``r'`` (a stacked FLoRA adapter of
rank ``sum r_i`` is rescaled so that ``(alpha / sum r_i) B' A'`` is the exact mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import torch

from fedalign.algorithms.align.solvers import solve_assignment
from fedalign.core.options import Range, conform
from fedalign.core.registry import Registry
from fedalign.core.tensors import normalised_weights

LORA_RULES = Registry("lora rule")
"""LoRA rule name -> ``rule(clients: [Adapter], weights, **options) -> LayerUpdate``;
``meta["equal_ranks"]``: the rule averages A and B entrywise, so every client of a layer must
have the same rank; ``meta["frozen"]``: the factor (``"A"``) the clients never train, shared
from one initialisation (it never travels); ``meta["local"]``: the factor (``"B"``) each client
keeps for itself between rounds (the server is not sent it back)."""

ClientAdapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""One client's adapters: layer name -> ``(A, B)`` with ``A: r x in``, ``B: out x r``."""


@dataclass(frozen=True)
class Adapter:
    """One layer's adapter: its weight change is ``scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def product(self) -> torch.Tensor:
        """The weight change ``scale * B A`` (out x in)."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class LayerUpdate:
    """What one rule makes of one layer's client adapters (see the module docstring for who
    receives what).

    ``delta``: the server's model becomes ``W0 + delta``. ``base``: added to the frozen base of
    the server and of every client (FedEx-LoRA's residual), None: the base stays. ``adapter``: the
    global adapter the clients continue from, None: no shared adapter. ``personal``: client ``i``
    continues from ``personal[i]`` instead (FedSA-LoRA's own B, FlexLoRA's rank-``r_i``
    truncation), None: every client takes ``adapter``."""

    delta: torch.Tensor
    adapter: Adapter | None = None
    base: torch.Tensor | None = None
    personal: tuple[Adapter, ...] | None = None


def _mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum p_i t_i`` (float64 in, float64 out)."""
    total = torch.zeros_like(tensors[0])
    for t, p in zip(tensors, weights.tolist()):
        total.add_(t, alpha=p)
    return total


def _common_scale(clients: Sequence[Adapter]) -> float:
    """The scale of equal-rank clients (one ``alpha``, one ``r``: one scale)."""
    return clients[0].scale


def _averaged(clients: Sequence[Adapter], weights: torch.Tensor) -> Adapter:
    """A and B averaged separately: FedIT's adapter, and the starting point of FedSA-LoRA,
    FedEx-LoRA and aligned-lora."""
    return Adapter(
        _mean([c.A for c in clients], weights),
        _mean([c.B for c in clients], weights),
        _common_scale(clients),
    )


def _stack(clients: Sequence[Adapter], weights: torch.Tensor) -> Adapter:
    """FLoRA's stacking: A_i as rows, ``p_i s_i B_i`` as columns, scale 1, so that
    ``B_stack A_stack = sum p_i s_i B_i A_i`` exactly, whatever the clients' ranks."""
    return Adapter(
        torch.cat([c.A for c in clients], dim=0),
        torch.cat([c.B * (p * c.scale) for c, p in zip(clients, weights.tolist())], dim=1),
    )


def _svd_factors(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``adapter.product()`` without forming the out x in matrix: QR of ``B`` and
    ``A^T``, then the SVD of the small middle factor (cost grows with the stacked rank, not with
    ``out * in``)."""
    qb, rb = torch.linalg.qr(adapter.B)
    qa, ra = torch.linalg.qr(adapter.A.T)
    u, s, vh = torch.linalg.svd(adapter.scale * rb @ ra.T, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def _truncated(factors: tuple[torch.Tensor, ...], rank: int) -> Adapter:
    """The best rank-``rank`` adapter (Eckart-Young), the singular values split evenly between B
    and A (``B = U sqrt(S)``, ``A = sqrt(S) Vh``) so neither factor dwarfs the other. A product of
    lower rank than asked is padded with zero components (only when ``rank > min(out, in)`` or
    the clients' stacked rank)."""
    u, s, vh = factors
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return Adapter(a, b)


def _mean_product(clients: Sequence[Adapter], weights: torch.Tensor) -> torch.Tensor:
    """The exact update ``sum p_i s_i B_i A_i`` (out x in)."""
    return _stack(clients, weights).product()


@LORA_RULES.register("fedit", equal_ranks=True)
def fedit(clients: Sequence[Adapter], weights: torch.Tensor) -> LayerUpdate:
    """FedIT (Zhang et al. 2024): FedAvg on A and B separately. The update is
    ``s B_bar A_bar``, not the mean of the products: the inexact baseline."""
    adapter = _averaged(clients, weights)
    return LayerUpdate(adapter.product(), adapter=adapter)


@LORA_RULES.register("ffa-lora", equal_ranks=True, frozen="A")
def ffa_lora(clients: Sequence[Adapter], weights: torch.Tensor) -> LayerUpdate:
    """FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at one shared initialisation and only B
    trains and travels, so ``mean(B_i) A = mean(B_i A)``: exact. Clients whose A differ break
    that premise, and are refused rather than averaged inexactly."""
    shared = clients[0].A
    for i, c in enumerate(clients[1:], start=1):
        if not torch.equal(c.A, shared):
            gap = float((c.A - shared).abs().max())
            raise ValueError(
                f"ffa-lora needs one frozen A shared by every client; client {i}'s A differs "
                f"from client 0's by up to {gap:.3g}"
            )
    adapter = Adapter(shared, _mean([c.B for c in clients], weights), _common_scale(clients))
    return LayerUpdate(adapter.product(), adapter=adapter)


@LORA_RULES.register("fedsa-lora", equal_ranks=True, local="B")
def fedsa_lora(clients: Sequence[Adapter], weights: torch.Tensor) -> LayerUpdate:
    """FedSA-LoRA (Guo et al., ICLR 2025): A (general knowledge) is averaged and shared, B
    (client-specific) stays on its client. Client ``i`` continues from ``(A_bar, B_i)``. The
    global update is the weighted mean of those personalised models' changes,
    ``sum p_i s B_i A_bar = s B_bar A_bar``: what a newcomer or the server's evaluation gets, the
    same product as FedIT (the rules differ in what the clients keep, not in the global model)."""
    adapter = _averaged(clients, weights)
    personal = tuple(replace(adapter, B=c.B) for c in clients)
    return LayerUpdate(adapter.product(), adapter=adapter, personal=personal)


@LORA_RULES.register("fedex-lora", equal_ranks=True)
def fedex_lora(clients: Sequence[Adapter], weights: torch.Tensor) -> LayerUpdate:
    """FedEx-LoRA (Singhal et al., ACL 2025): FedIT's adapter is broadcast, and the residual
    ``sum p_i s B_i A_i - s B_bar A_bar`` is folded into the frozen base, so base plus adapter is
    the exact mean. The residual is a full out x in matrix: exactness costs a dense download."""
    adapter = _averaged(clients, weights)
    exact = _mean_product(clients, weights)
    return LayerUpdate(exact, adapter=adapter, base=exact - adapter.product())


@LORA_RULES.register("flora")
def flora(
    clients: Sequence[Adapter],
    weights: torch.Tensor,
    *,
    rank: Annotated[int, Range(low=0)] = 0,
) -> LayerUpdate:
    """FLoRA (Wang et al., NeurIPS 2024): stack the A_i as rows and the ``p_i B_i`` as columns;
    the stacked adapter's product is the exact mean and its rank is ``sum r_i`` (heterogeneous
    ranks stack as they are). The paper folds that product into the base and restarts the
    adapters every round; a strategy can do either with this adapter. ``rank > 0`` truncates it
    back to that rank by SVD (the best rank-``rank`` approximation: no longer exact, the error is
    the discarded singular values)."""
    stacked = _stack(clients, weights)
    if 0 < rank < stacked.rank:
        stacked = _truncated(_svd_factors(stacked), rank)
    return LayerUpdate(stacked.product(), adapter=stacked)


@LORA_RULES.register("flexlora")
def flexlora(clients: Sequence[Adapter], weights: torch.Tensor) -> LayerUpdate:
    """FlexLoRA (Bai et al., NeurIPS 2024): the server forms the full weighted mean of the
    products (its model gets it exactly) and hands each client the best approximation of it at
    that client's own rank (SVD). The decomposition is taken in the clients' stacked rank, never
    of a dense out x in matrix."""
    stacked = _stack(clients, weights)
    factors = _svd_factors(stacked)
    personal = tuple(_truncated(factors, c.rank) for c in clients)
    return LayerUpdate(stacked.product(), personal=personal)


def _rotation(reference: Adapter, client: Adapter, method: str, signs: bool) -> torch.Tensor:
    """The orthogonal ``R`` (r x r) that best maps ``client`` onto ``reference``:
    ``(B R, R^T A)`` has the same product and its columns/rows face the reference's.

    The objective is ``<B_ref, B R> + <A_ref, R^T A> = tr(S R)`` with the similarity
    ``S = B_ref^T B + A_ref A^T`` (``S[j, k]``: reference component ``j`` against client component
    ``k``). ``hungarian``: R a permutation, with a sign per component when ``signs`` (flipping a
    column of B and the row of A leaves the product unchanged), so each pair scores ``|S[j, k]|``
    and takes the sign of ``S[j, k]``. ``procrustes``: R any orthogonal matrix, the polar factor
    of ``S^T`` (``U Vh`` of its SVD)."""
    similarity = reference.B.T @ client.B + reference.A @ client.A.T
    if method == "procrustes":
        u, _, vh = torch.linalg.svd(similarity.T)
        return u @ vh
    columns = solve_assignment(similarity.abs() if signs else similarity, "hungarian")
    picked = similarity[torch.arange(len(columns)), columns]
    sign = torch.where(picked < 0, -1.0, 1.0).to(similarity) if signs else torch.ones_like(picked)
    rotation = torch.zeros_like(similarity)
    rotation[columns, torch.arange(len(columns))] = sign
    return rotation


@LORA_RULES.register("aligned-lora", equal_ranks=True)
def aligned_lora(
    clients: Sequence[Adapter],
    weights: torch.Tensor,
    *,
    method: Literal["hungarian", "procrustes"] = "hungarian",
    reference: Literal["largest", "mean"] = "mean",
    iterations: Annotated[int, Range(low=1)] = 10,
    signs: bool = True,
) -> LayerUpdate:
    """Align the clients' rank bases to a reference, then average A and B (FedIT on aligned
    adapters). Each client's product is unchanged by its alignment, so what alignment removes is
    exactly the part of FedIT's error that comes from the same components sitting in different
    rank slots (or, with ``procrustes``, rotated): rank-permuted copies of one adapter come back
    exactly.

    ``reference``: ``largest`` aligns everyone to the client with the largest weight (the first
    of equals); ``mean`` starts there and then re-aligns everyone to the weighted mean of the
    aligned adapters, up to ``iterations`` times or until no client's alignment changes, so no
    single client's basis decides the result. ``method``/``signs``: see :func:`_rotation`."""
    target = clients[int(torch.argmax(weights))]
    rotations: list[torch.Tensor] = []
    for _ in range(iterations if reference == "mean" else 1):
        previous = rotations
        rotations = [_rotation(target, c, method, signs) for c in clients]
        aligned = [Adapter(r.T @ c.A, c.B @ r, c.scale) for c, r in zip(clients, rotations)]
        target = _averaged(aligned, weights)
        if previous and all(
            torch.allclose(r, q, rtol=0, atol=1e-12) for r, q in zip(rotations, previous)
        ):
            break
    return LayerUpdate(target.product(), adapter=target)


def _scale(alpha: float | None, rank: int) -> float:
    """LoRA's scaling ``alpha / r`` (1 without ``alpha``)."""
    return 1.0 if alpha is None else alpha / rank


def _client_adapter(
    client: int, layer: str, pair: Any, shape: tuple[int, int] | None, alpha: float | None
) -> Adapter:
    """One client's ``(A, B)`` for ``layer`` as a float64 :class:`Adapter`, or a ValueError
    naming the client and the layer."""
    where = f"client {client}, layer {layer!r}"
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{where}: expected an (A, B) pair, got {type(pair).__name__}")
    a, b = (torch.as_tensor(t) for t in pair)
    for name, t in (("A", a), ("B", b)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(
                f"{where}: {name} must be a 2-D float tensor, got {t.dtype} {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {name} has NaN or Inf entries")
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{where}: A is {tuple(a.shape)} and B {tuple(b.shape)}; "
            "A must be r x in and B out x r with the same r"
        )
    if shape is not None and (b.shape[0], a.shape[1]) != shape:
        raise ValueError(
            f"{where}: adapts an out x in = {b.shape[0]} x {a.shape[1]} weight, "
            f"client 0 a {shape[0]} x {shape[1]} one"
        )
    return Adapter(a.double(), b.double(), _scale(alpha, a.shape[0]))


def _published(adapter: Adapter, alpha: float | None, like: torch.Tensor) -> Adapter:
    """``adapter`` in the caller's convention: scale ``alpha / r`` at its own rank (B absorbs
    the difference, so the product is unchanged) and the clients' dtype."""
    scale = _scale(alpha, adapter.rank)
    factor = adapter.scale / scale
    b = adapter.B if factor == 1.0 else adapter.B * factor
    return Adapter(adapter.A.to(like.dtype), b.to(like.dtype), scale)


def best_adapter(change: torch.Tensor, rank: int, *, alpha: float | None = None) -> Adapter:
    """The best rank-``rank`` adapter of a dense ``out x in`` weight change (FlexLoRA's
    truncation, from the matrix itself): what a client of a rank no sampled client had continues
    from. Scale ``alpha / rank`` as :func:`lora_aggregate` publishes adapters."""
    u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
    return _published(_truncated((u, s, vh), rank), alpha, change)


def lora_aggregate(
    rule: str,
    adapters: Sequence[ClientAdapters],
    weights: Sequence[float] | None = None,
    *,
    alpha: float | None = None,
    **options: Any,
) -> dict[str, LayerUpdate]:
    """Apply the LoRA rule ``rule`` to every layer of the clients' ``adapters``: what the server
    broadcasts (global and per-client adapters, base updates) and its own model's change.

    ``adapters[i]`` is client ``i``'s ``{layer: (A, B)}``; every client adapts the same layers
    with the same out x in shapes (ranks may differ where the rule allows it). ``weights``: the
    clients' weights (example counts; None: equal). ``alpha``: LoRA's ``alpha`` (the change is
    ``(alpha / r) B A``; None: ``B A``). ``options``: the rule's options. Bad input of any kind is
    one ValueError line naming the client and the layer. Computes in float64 on the adapters'
    device; returns tensors in the clients' dtype.
    """
    entry = LORA_RULES.get(rule)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        takes = ", ".join(entry.options) or "no options"
        raise ValueError(f"lora rule {rule!r} does not take {unknown}; it takes {takes}")
    chosen = {
        **entry.options,
        **{k: conform(k, v, entry.types.get(k, Any)) for k, v in options.items()},
    }
    if alpha is not None and (isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive number (or None: no scaling), got {alpha!r}")
    if isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty list of per-client {layer: (A, B)} mappings")
    p = normalised_weights(weights, len(adapters))
    layers = list(adapters[0])
    for i, client in enumerate(adapters):
        if not isinstance(client, Mapping) or set(client) != set(layers):
            got = sorted(client) if isinstance(client, Mapping) else type(client).__name__
            raise ValueError(f"client {i} adapts layers {got}, client 0 {sorted(layers)}")
    result = {}
    for layer in layers:
        first = _client_adapter(0, layer, adapters[0][layer], None, alpha)
        shape = (first.B.shape[0], first.A.shape[1])
        clients = [first] + [
            _client_adapter(i, layer, c[layer], shape, alpha) for i, c in enumerate(adapters[1:], 1)
        ]
        ranks = [c.rank for c in clients]
        if entry.meta.get("equal_ranks") and len(set(ranks)) > 1:
            raise ValueError(
                f"{rule} averages A and B entrywise and needs equal ranks; layer {layer!r} has "
                f"ranks {ranks} (flora and flexlora take different ranks)"
            )
        a0, b0 = (torch.as_tensor(t) for t in adapters[0][layer])
        out = b0.to(torch.promote_types(a0.dtype, b0.dtype))
        try:
            update = entry.obj(clients, p.to(out.device), **chosen)
        except ValueError as exc:
            raise ValueError(f"layer {layer!r}: {exc}") from None
        dtype = out.dtype
        result[layer] = LayerUpdate(
            update.delta.to(dtype),
            adapter=None if update.adapter is None else _published(update.adapter, alpha, out),
            base=None if update.base is None else update.base.to(dtype),
            personal=None
            if update.personal is None
            else tuple(_published(a, alpha, out) for a in update.personal),
        )
    return result


def lora_update(
    rule: str,
    adapters: Sequence[ClientAdapters],
    weights: Sequence[float] | None = None,
    *,
    alpha: float | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """``{layer: the weight change the global model receives}`` (out x in, ``alpha / r``
    applied) under the LoRA rule ``rule``: the rules side by side on the same adapters, offline.
    Arguments as :func:`lora_aggregate`."""
    updates = lora_aggregate(rule, adapters, weights, alpha=alpha, **options)
    return {layer: u.delta for layer, u in updates.items()}


def mean_products(
    adapters: Sequence[ClientAdapters],
    weights: Sequence[float] | None = None,
    *,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer: sum p_i (alpha / r_i) B_i A_i}``: the exact update, the yardstick of a rule's
    aggregation error ``||exact - update|| / ||exact||`` (FLoRA's update, which is exact)."""
    return lora_update("flora", adapters, weights, alpha=alpha)
