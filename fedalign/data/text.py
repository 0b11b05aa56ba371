"""A character-level next-character task on Debian's ``fortunes`` corpus, one group per category.

Each fortune category (``art``, ``computers``, ``food``, ...) is a natural client, as the plays'
speakers are in LEAF's Shakespeare task. A sample is ``seq_len`` character ids and its label is the
id of the character that follows. The first 80% of each category's text is for training, the rest
for testing, so no window crosses the split or a category boundary and every category is in both
splits (group ids agree between them).

Corpus layout: one file per category, fortunes separated by lines holding only ``%``; the
``.dat`` indexes, the ``.u8`` links and subdirectories (``off/``) are skipped.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .errors import DataError, DatasetNotFoundError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Vocabulary: 0 = unknown (any other character), 1 = newline, 2 = tab, 3..97 = printable ASCII
# 32..126: 98 ids in all, exactly the char_lstm default ``vocab_size=98``.
VOCAB_SIZE = 98
UNKNOWN_ID = 0
TRAIN_FRACTION = 0.8
SEQ_LEN = 80
# A stride of 16 gives about 127,000 training and 32,000 test windows on Debian's corpus (2.5 M
# characters): enough for a char-LSTM, without 16x near-duplicate windows.
STRIDE = 16
_SKIPPED_SUFFIXES = (".dat", ".u8", ".pos", ".part")
_LOOKUP = np.zeros(256, dtype=np.int64)
_LOOKUP[ord("\n")] = 1
_LOOKUP[ord("\t")] = 2
_LOOKUP[32:127] = np.arange(3, VOCAB_SIZE)
_CHARS = np.array(["\ufffd", "\n", "\t", *map(chr, range(32, 127))])


def encode(text: str) -> np.ndarray:
    """Character ids of ``text``: int64, characters outside the vocabulary map to 0 (unknown)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 256, _LOOKUP[np.minimum(codes, 255)], UNKNOWN_ID)


def decode(ids: np.ndarray) -> str:
    """The text of character ids (unknown ids as U+FFFD)."""
    return "".join(_CHARS[np.asarray(ids, dtype=np.int64)])


def corpus_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$FEDALIGN_FORTUNES_DIR``, else Debian's location."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DatasetNotFoundError(f"fortunes: data_dir {data_dir} is not a directory")
        return Path(data_dir)
    for d in (os.environ.get("FEDALIGN_FORTUNES_DIR"), FORTUNES_DIR):
        if d and Path(d).is_dir():
            return Path(d)
    raise DatasetNotFoundError(
        f"the fortunes corpus is not in {FORTUNES_DIR}: install it with `apt install fortunes`, "
        "or pass data_dir / set FEDALIGN_FORTUNES_DIR to a directory of fortune files "
        "(one file per category, fortunes separated by lines holding only '%')"
    )


def read_categories(directory: Path, min_chars: int = 0) -> dict[str, str]:
    """Category name -> its fortunes joined by newlines (``%`` separator lines removed).

    Categories shorter than ``min_chars`` are left out (too short to give test windows); a file
    reached twice through symlinks is read once, under its first name.
    """
    texts: dict[str, str] = {}
    seen: set[Path] = set()
    for path in sorted(directory.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.suffix in _SKIPPED_SUFFIXES
            or path.resolve() in seen
        ):
            continue
        seen.add(path.resolve())
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        text = "\n".join(line for line in lines if line.strip() != "%")
        if len(text) >= min_chars:
            texts[path.name] = text
    return texts


def _windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) <= seq_len:
        return np.empty((0, seq_len), np.int64), np.empty(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
    return windows[:, :seq_len], windows[:, seq_len]


@functools.lru_cache(maxsize=4)
def load(
    split: str = "train", data_dir: str | None = None, seq_len: int = SEQ_LEN, stride: int = STRIDE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(X (n, seq_len) int64, y (n,) int64, groups (n,) int64, group_names)``, cached."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if int(seq_len) < 1 or int(stride) < 1:
        raise DataError(
            f"fortunes options seq_len and stride must be >= 1, got seq_len={seq_len}, "
            f"stride={stride}"
        )
    seq_len, stride = int(seq_len), int(stride)
    directory = corpus_dir(data_dir)
    # A category must leave at least one test window: 20% of its text > seq_len.
    texts = read_categories(directory, min_chars=int(np.ceil((seq_len + 1) / (1 - TRAIN_FRACTION))))
    if not texts:
        raise DatasetNotFoundError(
            f"fortunes: no category in {directory} is long enough for seq_len={seq_len}"
        )
    names = tuple(texts)
    xs, ys, gs = [], [], []
    for group, name in enumerate(names):
        ids = encode(texts[name])
        cut = int(TRAIN_FRACTION * len(ids))
        X, y = _windows(ids[:cut] if split == "train" else ids[cut:], seq_len, stride)
        xs.append(X)
        ys.append(y)
        gs.append(np.full(len(y), group, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), names
