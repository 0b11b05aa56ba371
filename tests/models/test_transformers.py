"""The zoo's transformers: shapes, causal masking, a few training steps, float64, what the data
implies, the client statistics they need (Grams of every linear map, Fisher), MOON's
representation, and the config reference listing them."""

import pytest
import torch

from fedalign.algorithms.stats import diagonal_fisher, gram_matrices, linear_layers
from fedalign.cli import main
from fedalign.client.training import evaluate, train_local
from fedalign.config.components import shape_options
from fedalign.models import build_model
from fedalign.models.features import forward_with_representation

SMALL = {"d_model": 16, "heads": 2, "layers": 2, "ff": 32}


def char_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("char_transformer", **{"vocab_size": 11, "context": 12, **SMALL, **options})


def vit_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit", **{"image_size": 8, "patch": 4, **SMALL, **options})


@pytest.mark.parametrize("length", [12, 5])
def test_char_transformer_predicts_the_next_character_of_each_window(length):
    model = char_model()
    tokens = torch.randint(0, 11, (3, length))
    assert model(tokens).shape == (3, 11)
    every = model.sequence_logits(tokens)
    assert every.shape == (3, length, 11)
    assert torch.allclose(model(tokens), every[:, -1], atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("channels, side", [(1, 8), (3, 12)])
def test_vit_classifies_images_with_either_pooling(pooling, channels, side):
    model = vit_model(pooling=pooling, in_channels=channels, image_size=side, num_classes=7)
    out = model(torch.rand(4, channels, side, side))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    assert (model.cls is not None) == (pooling == "cls")
    assert model.position.shape == ((side // 4) ** 2 + (pooling == "cls"), 16)


def test_a_later_character_changes_no_earlier_prediction():
    model = char_model().eval()
    tokens = torch.randint(0, 11, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (tokens[:, 7] + 1) % 11
    before, after = model.sequence_logits(tokens), model.sequence_logits(changed)
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_vit_attention_is_not_causal():
    """Every patch sees every other: the last patch changes the class token's output."""
    model = vit_model().eval()
    images = torch.rand(2, 1, 8, 8)
    changed = images.clone()
    changed[:, :, 4:, 4:] += 1.0
    assert not torch.allclose(model(images), model(changed))


def test_both_train_and_their_loss_drops():
    torch.manual_seed(1)
    tokens = torch.randint(0, 11, (64, 12))
    targets = tokens[:, 3]  # the character 9 places back: only attention reaches it
    labels = torch.randint(0, 2, (64,))
    images = torch.rand(64, 1, 8, 8)
    images[labels == 1, :, :4, :4] += 1.0  # class 1: a bright first patch
    vit = vit_model(num_classes=2)
    for model, X, y in ((char_model(), tokens, targets), (vit, images, labels)):
        before, _ = evaluate(model, X, y)
        train_local(model, X, y, epochs=10, batch_size=16, optimizer="adam", lr=3e-3)
        after, _ = evaluate(model, X, y)
        assert after < 0.8 * before, (type(model).__name__, before, after)


def test_float64_matches_float32():
    for model, x in (
        (char_model(), torch.randint(0, 11, (2, 12))),
        (vit_model(), torch.rand(2, 1, 8, 8)),
    ):
        single = model.eval()(x)
        double = model.double()(x if x.dtype == torch.long else x.double())
        assert double.dtype == torch.float64
        assert torch.allclose(double.float(), single, atol=1e-5)


def test_grams_cover_every_linear_map_and_fisher_every_parameter():
    """RegMean needs a Gram for each Linear (queries, keys, values, outputs, feed-forward, head)
    and the ViT's patch embedding, from token ids as from images; Fisher fusion a Fisher per
    parameter, the positions and the class token included."""
    for model, x in (
        (char_model(), torch.randint(0, 11, (6, 12))),
        (vit_model(), torch.rand(6, 1, 8, 8)),
    ):
        layers = linear_layers(model)
        assert sum(isinstance(m, torch.nn.Linear) for m in layers.values()) == 4 * 2 + 2 * 2 + 1
        grams = gram_matrices(model, x)
        assert set(grams) == set(layers)
        rows = 6 * 12 if x.dtype == torch.long else 6 * 5  # every position is an input row
        assert grams["blocks.0.attn.query"][-1, -1] == rows
        assert grams["head"][-1, -1] == 6  # the head reads one position per example
        fisher = diagonal_fisher(model, x)
        assert set(fisher) == {k for k, _ in model.named_parameters()}
        assert fisher["position"].sum() > 0
        assert all(torch.isfinite(f).all() for f in fisher.values())


def test_moons_representation_is_what_the_head_reads():
    """MOON contrasts the input of the last Linear: the last position's stream for the character
    model, the pooled token for the ViT (both pooling options)."""
    for model, x in (
        (char_model(), torch.randint(0, 11, (3, 12))),
        (vit_model(), torch.rand(3, 1, 8, 8)),
        (vit_model(pooling="mean"), torch.rand(3, 1, 8, 8)),
    ):
        logits, z = forward_with_representation(model.eval(), x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(z, model.features(x))


def test_the_data_implies_vocabulary_context_and_image_size():
    assert shape_options("char_transformer", (80,), 98) == {"vocab_size": 98, "context": 80}
    assert shape_options("vit", (3, 32, 32), 10) == {
        "in_channels": 3,
        "image_size": 32,
        "num_classes": 10,
    }


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("char_transformer", {"d_model": 30, "heads": 4}, "multiple of heads"),
        ("char_transformer", {"layers": 0}, "must be >= 1"),
        ("vit", {"patch": 5}, "divide image_size"),
        ("vit", {"pooling": "max"}, "pooling must be one of"),
    ],
)
def test_bad_options_are_one_clear_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **options)


def test_config_defaults_list_them(capsys):
    assert main(["config", "--defaults"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "# the model (" in l)
    assert "| char_transformer |" in line and "| vit" in line
