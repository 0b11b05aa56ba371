"""The registry of fuse rules: how the server combines aligned client models.

Every rule has one signature, ``(states, weights, stats, **options) -> fused state``: ``states``
are the clients' aligned state dicts, ``weights`` their example counts, ``stats[j]`` the
statistics client ``j`` reported (already in the aligned basis), holding at least the kinds the
rule declares in ``needs={"train": (...)}``. Its keyword-only parameters are its options, and
their defaults are the defaults a config gets. ``meta["check"]``, when registered, is
``(options, context) -> reason | None``: why the rule cannot run with these option values in this
federation (the config reports it as one line before anything runs). ``meta["robust"]`` declares
a Byzantine-robust rule (a minority of clients cannot steer its result): the pipeline then aligns
to a robust reference too (the aligners' ``reference: robust``): an alignment a minority steers
would hand that minority the basis the robust rule compares in; and a round whose fusion fails
falls back to the coordinate-wise median rather than the weighted mean (``fallback_rule``).
"""

from __future__ import annotations

from torch import nn

from fedalign.core.registry import Context, Registry

FUSE_RULES = Registry("fuse rule")


def no_recurrent_layers(context: Context) -> str | None:
    """Rules built on layer-input Grams cover Linear and Conv2d; an LSTM's recurrent weights have
    no input Gram."""
    if any(isinstance(m, nn.RNNBase) for m in context.model.modules()):
        return "covers Linear and Conv2d layers; the LSTM's recurrent weights have no input Gram"
    return None


def fallback_rule(fuse: str) -> str:
    """The rule a round falls back to when the fuse rule ``fuse`` fails or its result fails the
    fused-model check: ``median`` (the coordinate-wise median of the validated updates) for a rule
    registered ``robust=True``, whose users count on a minority not steering the model, the
    fallback included; ``mean`` (the weighted mean) otherwise."""
    return "median" if FUSE_RULES.get(fuse).meta.get("robust") else "mean"
