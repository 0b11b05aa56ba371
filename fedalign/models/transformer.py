"""Small transformers: a GPT-style causal character model and a ViT.

Both are written out by hand from ``nn.Linear``, ``nn.LayerNorm`` and
``F.scaled_dot_product_attention`` (no ``nn.MultiheadAttention``), so that what the permutation
spec has to follow is visible in the forward pass: the residual stream through the embeddings, a
learned positional ``nn.Parameter``, pre-norm blocks and the final norm; per block the
feed-forward units (GELU) and the attention heads (``view``/``transpose`` into heads, queries and
keys per head, values and the output projection per head). Dropout is left out: the models are
small and their clients' data is what regularises them, and deterministic forward passes keep the
statistics clients send (Grams, activations) reproducible.

Defaults are sized for a 2-core CPU (d_model 64, 2 layers, 4 heads); every width is an option, for
a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_widths(d_model: int, heads: int, layers: int, ff: int) -> None:
    if min(d_model, heads, layers, ff) < 1:
        raise ValueError(
            f"d_model, heads, layers and ff must be >= 1, got d_model={d_model}, heads={heads}, "
            f"layers={layers}, ff={ff}"
        )
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")


class SelfAttention(nn.Module):
    """Multi-head self-attention: separate query, key and value maps, ``heads`` heads of
    ``d_model // heads`` dimensions each, and an output projection over the concatenated heads."""

    def __init__(self, d_model: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, d_model // heads, causal
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor, batch, length) -> torch.Tensor:
        """(n, T, d) -> (n, heads, T, head_dim)."""
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.size(0), x.size(1)
        q = self._split(self.query(x), batch, length)
        k = self._split(self.key(x), batch, length)
        v = self._split(self.value(x), batch, length)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` with a
    GELU feed-forward of ``ff`` units."""

    def __init__(self, d_model: int, heads: int, ff: int, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, causal)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ff)
        self.fc2 = nn.Linear(ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _blocks(d_model: int, heads: int, layers: int, ff: int, causal: bool) -> nn.ModuleList:
    _check_widths(d_model, heads, layers, ff)
    return nn.ModuleList(Block(d_model, heads, ff, causal) for _ in range(layers))


class CharTransformer(nn.Module):
    """GPT-style causal character model: token embedding + learned positions (``context`` of
    them), ``layers`` pre-norm blocks with causal self-attention, a final LayerNorm and a linear
    map onto the vocabulary (not tied to the embedding).

    Input: int64 character ids ``(n, T)`` with ``T <= context``. ``forward`` returns the logits
    ``(n, vocab_size)`` of the character that follows the sequence (the text datasets' task: one
    label per window, as ``char_lstm``); ``sequence_logits`` returns every position's prediction
    ``(n, T, vocab_size)``, each seeing only the characters up to it.
    """

    def __init__(
        self,
        vocab_size: int = 98,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        context: int = 80,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or context < 1:
            raise ValueError(
                f"vocab_size and context must be >= 1, got vocab_size={vocab_size}, "
                f"context={context}"
            )
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = _blocks(d_model, heads, layers, ff, causal=True)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream after the final norm at every position, ``(n, T, d_model)``."""
        x = self.embedding(tokens) + self.position[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def sequence_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-character logits at every position, ``(n, T, vocab_size)``."""
        return self.head(self.stream(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The representation the head reads, ``(n, d_model)``: the last position's stream."""
        return self.stream(tokens)[:, -1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping ``patch`` x ``patch`` patches embedded by a
    Conv2d of stride ``patch``, learned positions, ``layers`` pre-norm blocks (bidirectional
    attention), a final LayerNorm, and a linear classifier on the class token
    (``pooling="cls"``) or on the mean over the patches (``pooling="mean"``, no class token).

    Input: float images ``(n, in_channels, image_size, image_size)`` with ``image_size`` a multiple
    of ``patch``; output: logits ``(n, num_classes)``.
    """

    POOLING = ("cls", "mean")

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        patch: int = 7,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        if pooling not in self.POOLING:
            raise ValueError(f"pooling must be one of {self.POOLING}, got {pooling!r}")
        if patch < 1 or image_size % patch:
            raise ValueError(
                f"patch must be >= 1 and divide image_size, got patch={patch}, "
                f"image_size={image_size}"
            )
        self.image_size, self.pooling = image_size, pooling
        self.patches = nn.Conv2d(in_channels, d_model, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + (pooling == "cls")
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02) if pooling == "cls" else None
        self.position = nn.Parameter(torch.randn(tokens, d_model) * 0.02)
        self.blocks = _blocks(d_model, heads, layers, ff, causal=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled representation after the final norm, ``(n, d_model)``."""
        x = self.patches(images).flatten(2).transpose(1, 2)  # (n, patches, d_model)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)
        x = x + self.position
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.pooling == "cls" else x.mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
