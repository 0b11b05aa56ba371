"""Permutation specs of attention models, derived by tracing: torch's nn.TransformerEncoder and
nn.MultiheadAttention, and attention written by hand with scaled_dot_product_attention. A random
permutation drawn from the spec leaves the function unchanged; weight matching brings a permuted
copy back, heads and all."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedalign
from fedalign.algorithms.align import (
    AxisRef,
    UnsupportedModuleError,
    apply_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
    sinkhorn_rebasin,
)
from fedalign.algorithms.align.solvers import solve_heads
from fedalign.algorithms.align.spec import HeadSet, PermutationSpec

VOCAB, D, HEADS, CONTEXT = 11, 12, 3, 7


class EncoderLM(nn.Module):
    """Token embedding + a learned positional nn.Parameter, torch's TransformerEncoder
    (batch_first, padding mask from the token ids), a final LayerNorm and an untied linear head."""

    def __init__(self, norm_first: bool, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.position = nn.Parameter(torch.randn(CONTEXT, D))
        layer = nn.TransformerEncoderLayer(
            D, HEADS, 20, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
        )
        final = nn.LayerNorm(D) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, layers, final, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.embedding(tokens) + self.position[: tokens.size(1)]
        return self.head(self.norm(self.encoder(x, src_key_padding_mask=tokens == 0)))


class SelfAttention(nn.Module):
    """Attention by hand: view/transpose into heads, scaled_dot_product_attention (causal, or
    with a mask), heads merged back for the output projection."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.query, self.key, self.value, self.out = (nn.Linear(D, D) for _ in range(4))

    def split(self, x):
        n, t, _ = x.shape
        return x.view(n, t, HEADS, D // HEADS).transpose(1, 2)

    def forward(self, x, mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        if self.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        n, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).contiguous().view(n, t, D))


class Block(nn.Module):
    """Pre-norm block with RMSNorm and a SwiGLU feed-forward (gate and up share one group)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.RMSNorm(D), SelfAttention(causal), nn.RMSNorm(D)
        self.gate, self.up, self.down = nn.Linear(D, 10), nn.Linear(D, 10), nn.Linear(10, D)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class HandWrittenLM(nn.Module):
    """GPT-style: embedding + learned positions, two blocks, LayerNorm, the unembedding tied to
    the embedding (F.linear on its weight). ``causal``: is_causal=True; else an explicit causal
    and padding mask built from the token ids."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.position = nn.Parameter(torch.randn(CONTEXT, D))
        self.blocks = nn.ModuleList(Block(causal) for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, tokens):
        t = tokens.size(1)
        x = self.embedding(tokens) + self.position[:t]
        pos = torch.arange(t, device=tokens.device)
        own = pos[:, None] == pos[None, :]
        mask = (pos[:, None] >= pos[None, :]) & ((tokens != 0)[:, None, None, :] | own)
        for block in self.blocks:
            x = block(x, mask)
        return F.linear(self.norm(x), self.embedding.weight)


class Attention(nn.Module):
    """nn.MultiheadAttention between three linear maps: packed ``in_proj_weight`` when the
    key and value widths are the embedding's, separate q/k/v weights when they differ."""

    def __init__(self, kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, D), nn.Linear(5, kdim or D), nn.Linear(5, vdim or D)
        self.attn = nn.MultiheadAttention(D, HEADS, kdim=kdim, vdim=vdim, add_bias_kv=True)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        y, _ = self.attn(torch.tanh(self.q(x)), torch.tanh(self.k(x)), self.v(x))
        return self.head(y)


def tokens(n: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(7))


MODELS = {
    "encoder-pre-norm": (lambda: EncoderLM(norm_first=True), tokens),
    "encoder-post-norm": (lambda: EncoderLM(norm_first=False), tokens),
    "causal-sdpa": (lambda: HandWrittenLM(causal=True), tokens),
    "masked-sdpa": (lambda: HandWrittenLM(causal=False), tokens),
    "mha-packed": (Attention, lambda: torch.randn(6, 2, 5, dtype=torch.float64)),
    "mha-separate": (lambda: Attention(kdim=8, vdim=7), lambda: torch.randn(6, 2, 5).double()),
}


def built(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, batch = MODELS[name]
    return make().double().eval(), batch()


@pytest.mark.parametrize("heads", ["both", "inner", "blocks"])
@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_preserves_the_function(name, heads):
    model, x = built(name)
    spec = permutation_spec(model, x[:2], heads=heads)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perms = random_permutation(spec, torch.Generator().manual_seed(1))
    permuted = apply_permutation(spec, perms, state)
    for key in (k for k in state if "in_proj_weight" in k or "query.weight" in k):
        assert not torch.equal(permuted[key], state[key]), key  # the attention rows moved
    model.load_state_dict(permuted)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    restored = apply_permutation(spec, invert_permutation(perms), permuted)
    assert all(torch.equal(restored[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["encoder-pre-norm", "causal-sdpa", "mha-packed"])
def test_weight_alignment_brings_a_permuted_copy_back(name):
    """aggregate_local with weight matching and the mean: the mean of a model and its permuted
    copy is the model (in the basis of one of the two; traced on the clients' own input)."""
    model, x = built(name)
    spec = permutation_spec(model, x[:2])
    assert spec.heads  # heads and the dimensions inside them are both matched
    state = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = apply_permutation(
        spec, random_permutation(spec, torch.Generator().manual_seed(2)), state
    )
    samples = [(x, torch.zeros(len(x), dtype=torch.long))] * 2
    plan = fedalign.Plan(align="weight", fuse="mean")
    fused = fedalign.aggregate_local(plan, model, [state, permuted], [1, 1], samples).state
    assert any(
        all(torch.allclose(fused[k], basis[k], atol=1e-12, rtol=0) for k in state)
        for basis in (state, permuted)
    )
    before = model(x)
    model.load_state_dict(fused)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_encoder_spec_one_stream_packed_heads_and_feed_forward_groups():
    model, x = built("encoder-pre-norm")
    spec = permutation_spec(model, x[:2])
    stream = spec.groups["embedding"]
    layer = "encoder.layers.0"
    assert {
        AxisRef("embedding.weight", 1),
        AxisRef("position", 1),
        AxisRef(f"{layer}.norm1.weight", 0),
        AxisRef(f"{layer}.self_attn.in_proj_weight", 1),
        AxisRef(f"{layer}.self_attn.out_proj.weight", 0),
        AxisRef(f"{layer}.linear1.weight", 1),
        AxisRef(f"{layer}.linear2.weight", 0),
        AxisRef("encoder.norm.weight", 0),
        AxisRef("head.weight", 1),
    } <= set(stream)
    assert (
        AxisRef(f"{layer}.self_attn.in_proj_weight", 0, repeat=2)
        in spec.groups[f"{layer}.self_attn.qk"]
    )
    assert (
        AxisRef(f"{layer}.self_attn.in_proj_weight", 0, offset=2 * D)
        in spec.groups[f"{layer}.self_attn.vo"]
    )
    assert spec.parameters[f"{layer}.self_attn.in_proj_weight"] == (
        f"{layer}.self_attn.qk+{layer}.self_attn.vo",
        "embedding",
    )
    assert HeadSet((f"{layer}.self_attn.qk", f"{layer}.self_attn.vo"), HEADS) in spec.heads
    assert spec.sizes[f"{layer}.linear1"] == 20
    # post-norm moves the norms, not the symmetry
    post = permutation_spec(built("encoder-post-norm")[0], x[:2])
    assert set(post.groups) == set(spec.groups) and post.heads == spec.heads
    blocks = permutation_spec(model, x[:2], heads="blocks")
    assert blocks.groups[f"{layer}.self_attn.heads"][0] == AxisRef(
        f"{layer}.self_attn.in_proj_bias", 0, block=D // HEADS, repeat=3
    )
    assert blocks.sizes[f"{layer}.self_attn.heads"] == HEADS and not blocks.heads
    inner = permutation_spec(model, x[:2], heads="inner")
    assert not any(h.move for h in inner.heads)
    with pytest.raises(ValueError, match="heads must be one of both, inner, blocks"):
        permutation_spec(model, x[:2], heads="all")


def test_hand_written_spec_merges_swiglu_ties_the_unembedding_and_splits_heads():
    model, x = built("causal-sdpa")
    spec = permutation_spec(model, x[:2])
    assert {AxisRef("blocks.0.gate.weight", 0), AxisRef("blocks.0.up.weight", 0)} <= set(
        spec.groups["blocks.0.gate"]
    )
    assert {AxisRef("blocks.0.norm1.weight", 0), AxisRef("embedding.weight", 1)} <= set(
        spec.groups["embedding"]
    )
    assert {
        AxisRef("blocks.0.attn.query.weight", 0),
        AxisRef("blocks.0.attn.key.weight", 0),
    } <= set(spec.groups["blocks.0.attn.query"])
    assert AxisRef("blocks.0.attn.out.weight", 1) in spec.groups["blocks.0.attn.value"]
    assert spec.parameters["embedding.weight"] == (None, "embedding")  # the vocabulary is output


def test_drawn_permutations_keep_heads_together():
    model, x = built("mha-packed")
    for heads, moves in (("both", True), ("inner", False)):
        spec = permutation_spec(model, x[:2], heads=heads)
        d = D // HEADS
        for seed in range(5):
            perms = random_permutation(spec, torch.Generator().manual_seed(seed))
            qk, vo = (perms[g].view(HEADS, d) // d for g in ("attn.qk", "attn.vo"))
            assert (qk == qk[:, :1]).all() and torch.equal(qk, vo)  # whole heads, moved alike
            assert moves or torch.equal(qk[:, 0], torch.arange(HEADS))


def test_solve_heads_is_the_joint_optimum():
    """Planted: each group's scores are a head-structured permutation's indicator plus noise
    smaller than the margins; the joint solve recovers it, and without moving it keeps heads."""
    g = torch.Generator().manual_seed(0)
    count, d = 4, 3
    order = torch.randperm(count, generator=g)
    planted = {
        name: torch.cat([int(h) * d + torch.randperm(d, generator=g) for h in order])
        for name in ("qk", "vo")
    }
    scores = {}
    for name, p in planted.items():
        s = 0.1 * torch.rand(count * d, count * d, generator=g, dtype=torch.float64)
        s[torch.arange(count * d), p] += 1
        scores[name] = s
    assert all(torch.equal(a, planted[k]) for k, a in solve_heads(scores, count).items())
    still = solve_heads(scores, count, move=False)
    assert all(
        torch.equal(p.view(count, d) // d, torch.arange(count)[:, None].expand(count, d))
        for p in still.values()
    )


def test_methods_that_permute_freely_refuse_head_sets():
    model, x = built("mha-packed")
    spec = permutation_spec(model, x[:2])
    state = model.state_dict()
    with pytest.raises(ValueError, match="Sinkhorn re-basin permutes every unit .* heads='blocks'"):
        sinkhorn_rebasin(spec, state, state, steps=1)
    sinkhorn_rebasin(permutation_spec(model, x[:2], heads="blocks"), state, state, steps=1)
    with pytest.raises(ValueError, match="packs groups 'attn.qk' and 'attn.vo'"):
        spec.axes_of("attn.in_proj_weight")


def test_spec_checks_packed_axes_and_head_sets():
    shapes = {"w": (6, 2)}
    ok = PermutationSpec(
        {"a": (AxisRef("w", 0, repeat=2),), "b": (AxisRef("w", 0, offset=4),)},
        {"a": 2, "b": 2},
        shapes,
        heads=(HeadSet(("a", "b"), 2),),
    )
    assert [g for g, _ in ok.refs_of("w")] == ["a", "b"]
    with pytest.raises(ValueError, match="claimed by groups 'a' and 'b'"):
        PermutationSpec(
            {"a": (AxisRef("w", 0, repeat=2),), "b": (AxisRef("w", 0, offset=3),)},
            {"a": 2, "b": 2},
            shapes,
        )
    with pytest.raises(ValueError, match="'b' \\(2 units\\) does not fit axis 0 of 'w'"):
        PermutationSpec(
            {"a": (AxisRef("w", 0),), "b": (AxisRef("w", 0, offset=3),)}, {"a": 2, "b": 2}, shapes
        )
    with pytest.raises(ValueError, match="'a' \\(2 units\\) does not split into 3 heads"):
        PermutationSpec(
            {"a": (AxisRef("w", 0, repeat=3),)}, {"a": 2}, shapes, heads=(HeadSet(("a",), 3),)
        )


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.decoder = nn.TransformerDecoderLayer(D, HEADS, 16, batch_first=True)

    def forward(self, tokens):
        x = self.embedding(tokens)
        return self.decoder(x, x)


class _Unsplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


class _PerHeadWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.attn = nn.MultiheadAttention(D, HEADS)

    def forward(self, x):
        h = self.fc(x)
        return self.attn(h, h, h, average_attn_weights=False)[1]


def test_unsupported_attention_is_named():
    with pytest.raises(
        UnsupportedModuleError, match="module 'decoder' \\(TransformerDecoderLayer\\)"
    ):
        permutation_spec(_Decoder(), tokens(2))
    with pytest.raises(UnsupportedModuleError, match="must all be split into the same heads"):
        permutation_spec(_Unsplit(), torch.zeros(2, 4, D))
    with pytest.raises(UnsupportedModuleError, match="module 'attn' .*average_attn_weights=False"):
        permutation_spec(_PerHeadWeights(), torch.zeros(4, 2, D))
