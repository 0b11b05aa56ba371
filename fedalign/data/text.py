"""A character-level next-character task on Debian's ``fortunes`` corpus, one group per category.

Each fortune category (``art``, ``computers``, ``food``, ...) is a natural client, as the plays'
speakers are in LEAF's Shakespeare task. A sample is ``seq_len`` characters and the label is the
character that follows. The first 80% of each category's text is for training, the rest for
testing, so no window crosses the split.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .errors import DatasetNotFoundError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Vocabulary: 0 = unknown, 1 = newline, 2 = tab, 3.. = printable ASCII 32..126 (98 ids in all,
# the char_lstm default).
VOCAB_SIZE = 98
TRAIN_FRACTION = 0.8
_LOOKUP = np.zeros(256, dtype=np.int64)
_LOOKUP[ord("\n")] = 1
_LOOKUP[ord("\t")] = 2
_LOOKUP[32:127] = np.arange(3, 98)


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (non-ASCII characters map to 0, unknown)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 256, _LOOKUP[np.minimum(codes, 255)], 0)


def decode(ids: np.ndarray) -> str:
    table = {1: "\n", 2: "\t", **{i: chr(29 + i) for i in range(3, 98)}}
    return "".join(table.get(int(i), "\ufffd") for i in ids)


def corpus_dir(data_dir: str | Path | None = None) -> Path:
    for d in (data_dir, os.environ.get("FEDALIGN_FORTUNES_DIR"), FORTUNES_DIR):
        if d and Path(d).is_dir():
            return Path(d)
    raise DatasetNotFoundError(
        f"the fortunes corpus is not in {FORTUNES_DIR}: install it with `apt install fortunes`, "
        "or point FEDALIGN_FORTUNES_DIR at a directory of fortune files"
    )


def read_categories(directory: Path, min_chars: int) -> dict[str, str]:
    """Category name -> its fortunes joined by newlines (``%`` separator lines removed)."""
    texts = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.name.startswith("."):
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        text = "\n".join(line for line in lines if line.strip() != "%")
        if len(text) >= min_chars:
            texts[path.name] = text
    return texts


@functools.lru_cache(maxsize=4)
def load(
    split: str = "train", data_dir: str | None = None, seq_len: int = 80, stride: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(X (n, seq_len) int64, y (n,) int64, groups (n,) int64, group_names)``."""
    texts = read_categories(corpus_dir(data_dir), min_chars=10 * (seq_len + 1))
    names = tuple(texts)
    xs, ys, gs = [], [], []
    for group, name in enumerate(names):
        ids = encode(texts[name])
        cut = int(TRAIN_FRACTION * len(ids))
        part = ids[:cut] if split == "train" else ids[cut:]
        windows = np.lib.stride_tricks.sliding_window_view(part, seq_len + 1)[::stride]
        xs.append(windows[:, :seq_len])
        ys.append(windows[:, seq_len])
        gs.append(np.full(len(windows), group, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), names
