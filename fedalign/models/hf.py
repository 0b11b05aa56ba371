"""Hugging Face ``transformers`` models from disk (the ``hf`` extra): ``model: {name: hf, path:
DIR}``, DIR a causal LM or a sequence classifier saved with ``save_pretrained``.

Loaded offline (``local_files_only``, ``HF_HUB_OFFLINE`` set for the load): no hub is needed.
The zoo's text datasets (fortunes, shakespeare) give windows of character ids and the id of the
next character as the label. Those ids are the model's token ids as they are: a subword
tokenizer saved beside the model would cut the text into other units than the characters the
task predicts, so it is not used, and the model's vocabulary must hold the dataset's
(``vocab_size >= num_classes``); a causal LM's class logits are its logits for tokens
``0..num_classes-1`` at the window's last position. A sequence classifier's ``num_labels`` must
be the dataset's number of classes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

CLASSIFIER = "ForSequenceClassification"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for one load, the environment as it was afterwards."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


class HFModel(nn.Module):
    """A saved ``transformers`` model as a zoo model: token ids ``(n, T)`` in, class logits
    ``(n, num_classes)`` out."""

    def __init__(self, model: nn.Module, num_classes: int, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.causal = causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens).logits
        return logits[:, -1, : self.num_classes] if self.causal else logits


def hf_model(*, path: str, num_classes: int | None = None, context: int | None = None) -> nn.Module:
    """The model saved in ``path`` (``save_pretrained``), checked against the data: its
    vocabulary holds the ``num_classes`` character ids (a classifier: as many labels) and its
    positions the ``context`` characters of a window. Bad input is one ValueError line."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise ValueError("model hf needs transformers: pip install 'fedalign[hf]'") from None
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"model hf: {folder} holds no config.json (a save_pretrained folder)")
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    causal = not any(a.endswith(CLASSIFIER) for a in architectures)
    auto = (
        transformers.AutoModelForCausalLM
        if causal
        else (transformers.AutoModelForSequenceClassification)
    )
    # On the CPU even inside a meta-device context (the runner's shape check builds models on
    # the meta device): from_pretrained refuses one, and the weights are read from disk anyway.
    with _offline(), torch.device("cpu"):
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"model hf: cannot load {folder}: {first}") from None
    config = model.config
    classes = num_classes if num_classes is not None else config.vocab_size
    if causal and config.vocab_size < classes:
        raise ValueError(
            f"model hf: its vocabulary has {config.vocab_size} tokens, fewer than the dataset's "
            f"{classes} character ids"
        )
    if not causal and config.num_labels != classes:
        raise ValueError(
            f"model hf: a classifier of {config.num_labels} labels for {classes} classes"
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if context is not None and positions is not None and context > positions:
        raise ValueError(
            f"model hf: windows of {context} tokens, more than its {positions} positions"
        )
    return HFModel(model, classes, causal)
