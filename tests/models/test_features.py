"""The representation MOON contrasts (issue 23): for every zoo model, the input of the layer that
gives its logits, read from the same forward pass, found without naming the layer."""

import pytest
import torch
from torch import nn

from fedalign.models import build_model
from fedalign.models.features import classifier, forward_with_representation


@pytest.mark.parametrize(
    "name, batch",
    [
        ("mlp", torch.rand(3, 1, 28, 28)),
        ("lenet", torch.rand(3, 1, 28, 28)),
        ("vgg9", torch.rand(2, 1, 28, 28)),
        ("resnet20", torch.rand(2, 1, 28, 28)),
        ("char_lstm", torch.randint(0, 98, (3, 12))),
    ],
)
def test_the_representation_is_what_the_classifier_reads(name, batch):
    torch.manual_seed(0)
    model = build_model(name).eval()
    logits, z = forward_with_representation(model, batch)
    head = classifier(model)
    assert z.shape == (len(batch), head.in_features)
    torch.testing.assert_close(logits, model(batch))
    torch.testing.assert_close(head(z), logits)  # the classifier of the representation: the logits
    assert not head._forward_hooks  # the hook lived for that one call


def test_the_mlps_representation_is_its_last_hidden_layer():
    torch.manual_seed(0)
    model = build_model("mlp", in_features=5, hidden=[4, 3], num_classes=2)
    x = torch.randn(6, 5)
    hidden = torch.relu(model.layers[1](torch.relu(model.layers[0](x))))
    torch.testing.assert_close(forward_with_representation(model, x)[1], hidden)


class Scaled(nn.Module):
    """Logits that are not its last linear layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.fc(x)


@pytest.mark.parametrize(
    ("model", "message"),
    [(Scaled(), "output is not its last linear layer's"), (nn.ReLU(), "has no linear layer")],
)
def test_a_model_without_a_representation_is_told_in_one_line(model, message):
    with pytest.raises(ValueError, match=message):
        forward_with_representation(model, torch.randn(3, 4))
