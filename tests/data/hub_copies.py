"""Tiny copies of CIFAR-10, FEMNIST and Shakespeare with the hub's own schemas, for the tests.

Each writes what a user's local copy would be (``save_to_disk`` folder, parquet files as the hub
serves them, or Shakespeare's CSV), so the tests load them through exactly the code that loads
the real datasets. Images carry a class-dependent brightness so that two rounds can learn
something.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

LEAF_WORDS = "To be, or not to be: that is the question. Whether 'tis nobler in the mind"


def _image(rng: np.random.Generator, label: int, num_classes: int, side: int, channels: int):
    from PIL import Image

    base = 255.0 * (label + 0.5) / num_classes
    pixels = np.clip(rng.normal(base, 40.0, (side, side, channels)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def cifar10(n_train: int = 120, n_test: int = 40, seed: int = 0):
    """A ``DatasetDict`` like ``uoft-cs/cifar10``: ``img`` (32x32 RGB PIL), ``label`` (10)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    rng = np.random.default_rng(seed)
    features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})

    def split(n: int) -> Dataset:
        labels = np.arange(n) % 10
        images = [_image(rng, int(k), 10, 32, 3) for k in labels]
        return Dataset.from_dict({"img": images, "label": labels.tolist()}, features=features)

    return DatasetDict(train=split(n_train), test=split(n_test))


def femnist(writers: int = 6, per_writer: int = 30, seed: int = 0):
    """A ``DatasetDict`` like ``flwrlabs/femnist`` (a train split only): ``image`` (28x28 L),
    ``writer_id``, ``hsf_id``, ``character`` (62 classes); each writer uses a few classes."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    rng = np.random.default_rng(seed)
    names = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
    rows = {"image": [], "writer_id": [], "hsf_id": [], "character": []}
    for w in range(writers):
        classes = rng.choice(62, size=5, replace=False)
        for k in rng.choice(classes, size=per_writer + 3 * w):  # writers of different sizes
            rows["image"].append(_image(rng, int(k), 62, 28, 1))
            rows["writer_id"].append(f"f{w:04d}_{w + 10:02d}")
            rows["hsf_id"].append(w % 4)
            rows["character"].append(int(k))
    features = Features(
        {
            "image": Image(),
            "writer_id": Value("string"),
            "hsf_id": Value("int64"),
            "character": ClassLabel(names=names),
        }
    )
    return DatasetDict(train=Dataset.from_dict(rows, features=features))


def shakespeare_rows(roles: int = 5, chars: int = 560, seed: int = 0) -> dict[str, list[str]]:
    """LEAF's Shakespeare rows: per role, every 80-character window of its text (``x``), the
    character that follows (``y``) and the role (``character_id``), in text order."""
    rng = np.random.default_rng(seed)
    words = LEAF_WORDS.split()
    rows = {"character_id": [], "x": [], "y": []}
    for r in range(roles):
        text = " ".join(rng.choice(words, size=chars))[: chars + 20 * r]
        text = text.replace("nobler", "nobler\n")  # newlines are in LEAF's character set
        for i in range(len(text) - 80):
            rows["character_id"].append(f"THE_PLAY_ROLE_{r}")
            rows["x"].append(text[i : i + 80])
            rows["y"].append(text[i + 80])
    return rows


def shakespeare(roles: int = 5, chars: int = 560, seed: int = 0):
    """A ``DatasetDict`` like ``flwrlabs/shakespeare`` (a train split only)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(train=Dataset.from_dict(shakespeare_rows(roles, chars, seed)))


BUILDERS = {"cifar10": cifar10, "femnist": femnist, "shakespeare": shakespeare}


def write(name: str, root: Path, form: str = "save_to_disk") -> Path:
    """Write the tiny copy of ``name`` under ``root/name`` in ``form``: ``save_to_disk``,
    ``parquet`` (the hub's ``data/<split>-00000-of-00001.parquet`` layout) or ``csv``
    (Shakespeare's single ``shakespeare.csv``)."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    target = Path(root) / name
    if form == "save_to_disk":
        BUILDERS[name]().save_to_disk(str(target))
    elif form == "parquet":
        for split, ds in BUILDERS[name]().items():
            (target / "data").mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(target / "data" / f"{split}-00000-of-00001.parquet"))
    elif form == "csv":
        target.mkdir(parents=True, exist_ok=True)
        BUILDERS[name]()["train"].to_csv(str(target / f"{name}.csv"), index=False)
    else:
        raise ValueError(f"unknown form {form!r}")
    return target
