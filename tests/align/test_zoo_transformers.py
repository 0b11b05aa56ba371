"""The zoo's transformers (char_transformer, vit with a class token or mean pooling) under their
derived permutation specs: a random permutation keeps the function, and every aligner that takes
them (weight matching, activation matching with heads matched as blocks, Sinkhorn re-basin) brings
a permuted copy back, through ``aggregate_local`` as a study or ``fedalign merge`` runs it."""

import pytest
import torch

import fedalign
from fedalign.algorithms.align import (
    activation_statistics,
    apply_permutation,
    permutation_spec,
    permutations_from_statistics,
    random_permutation,
    sinkhorn_rebasin,
)
from fedalign.config.components import StrategyContext
from fedalign.core.registry import STRATEGIES
from fedalign.models import CharTransformer, ViT

SMALL = {"d_model": 8, "heads": 2, "layers": 2, "ff": 12}


def char_model(context: int = 6) -> CharTransformer:
    return CharTransformer(vocab_size=9, context=context, **SMALL)


def vit(pooling: str) -> ViT:
    return ViT(in_channels=1, image_size=8, num_classes=5, patch=4, pooling=pooling, **SMALL)


def tokens(n: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 9, (n, length), generator=torch.Generator().manual_seed(5))


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


ZOO = {
    "char_transformer": (char_model, tokens),
    "vit-cls": (lambda: vit("cls"), images),
    "vit-mean": (lambda: vit("mean"), images),
}


def built(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, data = ZOO[name]
    return make().double().eval(), data(16)


def permuted_copy(model, x, heads: str = "both", seed: int = 3):
    spec = permutation_spec(model, x[:2], heads=heads)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return (
        spec,
        state,
        apply_permutation(
            spec, random_permutation(spec, torch.Generator().manual_seed(seed)), state
        ),
    )


@pytest.mark.parametrize("heads", ["both", "inner", "blocks"])
@pytest.mark.parametrize("name", list(ZOO))
def test_random_permutation_keeps_the_function(name, heads):
    model, x = built(name)
    spec, state, permuted = permuted_copy(model, x, heads)
    assert spec.heads if heads != "blocks" else not spec.heads
    before = model(x)
    assert not torch.equal(
        permuted["blocks.0.attn.query.weight"], state["blocks.0.attn.query.weight"]
    )
    assert not torch.equal(permuted["blocks.1.fc1.weight"], state["blocks.1.fc1.weight"])
    model.load_state_dict(permuted)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def back_to_the_model(name: str, align: str, heads: str = "both", **options) -> None:
    """aggregate_local(align, mean) of a model and its permuted copy is the model (in the basis
    of either) and computes what it did."""
    model, x = built(name)
    _, state, permuted = permuted_copy(model, x, heads)
    samples = [(x, torch.zeros(len(x), dtype=torch.long))] * 2
    plan = fedalign.Plan(align=align, fuse="mean", options=options)
    fused = fedalign.aggregate_local(plan, model, [state, permuted], [1, 1], samples).state
    assert any(
        all(torch.allclose(fused[k], basis[k], atol=1e-9, rtol=0) for k in state)
        for basis in (state, permuted)
    ), align
    before = model(x)
    model.load_state_dict(fused)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(ZOO))
def test_weight_alignment_returns_the_model(name):
    back_to_the_model(name, "weight")


@pytest.mark.parametrize("name", list(ZOO))
def test_activation_alignment_returns_the_model(name):
    """Activation matching reads the queries and keys per head (split as the attention gets
    them) and the heads' outputs before the output projection, and keeps heads whole; with
    ``activation_sites: all`` the residual stream at every block's input."""
    back_to_the_model(name, "activation")
    back_to_the_model(name, "activation", activation_sites="all")


def test_sinkhorn_rebasin_takes_heads_as_blocks():
    """Sinkhorn re-basin permutes a group's units freely, so the pipeline derives its spec with
    heads as blocks; a copy whose heads (not the dimensions inside them) moved comes back."""
    assert fedalign.Plan(align="sinkhorn-rebasin").attention_heads() == "blocks"
    assert fedalign.Plan(align="activation").attention_heads() == "both"
    assert fedalign.Plan(align="weight", heads="inner").attention_heads() == "inner"
    model, x = built("char_transformer")
    spec, state, permuted = permuted_copy(model, x, heads="blocks")
    perms = sinkhorn_rebasin(spec, state, permuted, steps=20)
    back = apply_permutation(spec, perms, permuted)
    assert all(torch.allclose(back[k], state[k], atol=1e-12, rtol=0) for k in state)


def test_activation_sites_of_attention_and_their_statistics():
    model, x = built("char_transformer")
    spec = permutation_spec(model, x[:2])
    qk, vo = spec.activations["blocks.0.attn.query"], spec.activations["blocks.0.attn.value"]
    assert len(qk) == 2 and all(site.heads == (-3, -1) for site in qk)  # queries and keys
    assert len(vo) == 1 and vo[0].heads is None  # the output projection's input
    stream = spec.activations["embedding"]  # read by both blocks' maps and the head
    assert not stream[0].later and len(stream) == 5 and all(s.later for s in stream[1:])
    stats = activation_statistics(spec, model, model, x)
    rows = len(x) * x.shape[1]
    assert float(stats["blocks.0.attn.query"]["count"]) == 2 * rows
    assert float(stats["blocks.0.attn.value"]["count"]) == rows
    assert float(stats["embedding"]["count"]) == rows
    pooled = activation_statistics(spec, model, model, x, sites="all")
    # four blocks' maps read every position, the head the last one
    assert float(pooled["embedding"]["count"]) == 4 * rows + len(x)
    assert float(pooled["blocks.0.fc1"]["count"]) == rows
    # a model against itself: every group comes out the identity, heads included
    perms = permutations_from_statistics(stats, spec=spec)
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms.values())
    blocks = permutation_spec(model, x[:2], heads="blocks")
    with pytest.raises(ValueError, match="no activation site .*heads='blocks'"):
        activation_statistics(blocks, model, model, x)


def test_strategies_trace_on_the_runs_input():
    """A char transformer with a context of 4 cannot be traced on the 5 tokens guessed from its
    embedding; FedAvg's pipeline traces on the context's example input instead, with heads as
    its aligner takes them."""
    model = char_model(context=4)
    with pytest.raises(RuntimeError, match="ShapeProp error"):
        permutation_spec(model)
    fedavg = STRATEGIES.get("fedavg").obj
    for align, has_heads in (("weight", True), ("sinkhorn-rebasin", False)):
        context = StrategyContext(
            model=model, plan=fedalign.Plan(align=align), example_input=tokens(2, 4)
        )
        spec = fedavg(context).spec
        assert bool(spec.heads) == has_heads
        assert spec.sizes["blocks.1.fc1"] == SMALL["ff"]
