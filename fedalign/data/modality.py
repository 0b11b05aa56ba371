"""Preprocessing per modality, declared by a dataset's registry entry: Arrow columns -> arrays.

``Images``: decode (PNG/JPEG bytes, or a path next to the copy), convert to the declared channels
(1: greyscale, 3: RGB), resize to ``size`` x ``size`` when declared, scale to [0, 1] and normalise
per channel: float32 ``(n, C, H, W)``. ``Characters``: fixed-length strings -> int64 ids over a
character set (LEAF's 80 characters for Shakespeare): ``(n, seq_len)`` inputs, and the next
character's id as the label.

Image decoding is one PIL call per image (nothing decodes a batch of PNGs at once); everything
else works on whole columns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError

#: LEAF's Shakespeare character set (``models/utils/language_utils.py``: ``ALL_LETTERS``).
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
_MODES = {1: "L", 3: "RGB"}
_GREY = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class Images:
    """Images in ``column``: ``channels`` (None: 1 if the first image is greyscale, else 3),
    square side ``size`` (None: as stored, every image the same size), per-channel ``mean`` and
    ``std`` applied after scaling to [0, 1] (empty: no normalisation)."""

    column: str
    channels: int | None = None
    size: int | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    def inputs(self, table: pa.Table, root: Path, where: str) -> np.ndarray:
        """float32 ``(n, C, H, W)`` of the column's images (``root``: where relative image paths
        are resolved; ``where`` names the copy in errors)."""
        blobs, paths = _image_sources(table.column(self.column), where, self.column)
        n = len(blobs)
        first = _open(blobs, paths, 0, root, where, self.column) if n else None
        channels = self.channels or (1 if first is not None and first.mode in _GREY else 3)
        if channels not in _MODES:
            raise DataError(f"{where}: images have 1 or 3 channels, not {channels}")
        side = (self.size, self.size) if self.size else (first.size if first else (0, 0))
        out = np.empty((n, side[1], side[0], channels), dtype=np.uint8)
        for i in range(n):
            image = first if i == 0 else _open(blobs, paths, i, root, where, self.column)
            image = image.convert(_MODES[channels])
            if image.size != side:
                if not self.size:
                    raise DataError(
                        f"{where}: image {i} of column {self.column!r} is {image.size[0]}x"
                        f"{image.size[1]}, the first is {side[0]}x{side[1]}; declare a size"
                    )
                image = image.resize(side)
            out[i] = np.asarray(image).reshape(side[1], side[0], channels)
        X = out.transpose(0, 3, 1, 2).astype(np.float32)
        X /= 255.0
        if self.mean:
            if len(self.mean) != channels or len(self.std) != channels:
                raise DataError(f"{where}: normalisation needs one mean and std per channel")
            X -= np.asarray(self.mean, np.float32)[None, :, None, None]
            X /= np.asarray(self.std, np.float32)[None, :, None, None]
        return X


def _image_sources(column: pa.ChunkedArray, where: str, name: str) -> tuple[list, list]:
    """Each image's bytes and path (``struct<bytes, path>`` as ``datasets`` stores images, or
    plain binary)."""
    array = column.combine_chunks()
    if pa.types.is_struct(array.type) and array.type.get_field_index("bytes") >= 0:
        has_path = array.type.get_field_index("path") >= 0
        paths = array.field("path").to_pylist() if has_path else [None] * len(array)
        return array.field("bytes").to_pylist(), paths
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.to_pylist(), [None] * len(array)
    raise DataError(f"{where}: column {name!r} holds {array.type}, not images")


def _open(blobs: list, paths: list, i: int, root: Path, where: str, name: str):
    """Image ``i`` as a PIL image: from its bytes, else from its path (relative to ``root``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if blobs[i] is not None:
            return Image.open(io.BytesIO(blobs[i]))
        if paths[i] is not None:
            return Image.open(root / paths[i])
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{where}: image {i} of column {name!r} cannot be read: {exc}") from None
    raise DataError(f"{where}: image {i} of column {name!r} is empty")


@dataclass(frozen=True)
class Characters:
    """Next-character prediction: ``x_column`` holds ``seq_len``-character strings, ``y_column``
    the character that follows. Ids index ``charset``; a character outside it gets the last id,
    where LEAF's ``letter_to_vec`` puts it (``str.find`` gives -1, and one-hot index -1 is the
    last)."""

    x_column: str
    y_column: str
    charset: str = LEAF_LETTERS
    seq_len: int = 80

    def columns(self) -> tuple[str, ...]:
        return (self.x_column, self.y_column)

    @property
    def num_classes(self) -> int:
        return len(self.charset)

    def inputs(self, table: pa.Table, root: Path, where: str) -> np.ndarray:
        return self._ids(table, self.x_column, self.seq_len, where)

    def labels(self, table: pa.Table, where: str) -> np.ndarray:
        return self._ids(table, self.y_column, 1, where)[:, 0]

    def _ids(self, table: pa.Table, name: str, length: int, where: str) -> np.ndarray:
        array = table.column(name).combine_chunks()
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise DataError(f"{where}: column {name!r} holds {array.type}, not text")
        if array.null_count:
            raise DataError(f"{where}: column {name!r} has {array.null_count} empty values")
        lengths = pc.utf8_length(array).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != length)
        if bad.size:
            raise DataError(
                f"{where}: row {int(bad[0])} of column {name!r} has {int(lengths[bad[0]])} "
                f"characters, expected {length}"
            )
        ascii_only = bool(
            np.array_equal(pc.binary_length(array).to_numpy(zero_copy_only=False), lengths)
        )
        unknown = len(self.charset) - 1
        if ascii_only and len(self.charset) <= 256:  # one byte -> id table, by bytes.translate
            table = np.full(256, unknown, dtype=np.uint8)
            for i, c in enumerate(self.charset):
                if ord(c) < 256:
                    table[ord(c)] = i
            translated = _ascii_bytes(array).translate(table.tobytes())
            ids = np.frombuffer(translated, dtype=np.uint8).astype(np.int64)
        else:  # code points up to the charset's largest, one more slot for everything above
            lookup = np.full(max(map(ord, self.charset)) + 2, unknown, dtype=np.int64)
            lookup[[ord(c) for c in self.charset]] = np.arange(len(self.charset))
            ids = lookup[np.minimum(_codes(array), len(lookup) - 1)]
        return ids.reshape(len(array), length)


def _ascii_bytes(array: pa.Array) -> bytes:
    """The characters of an all-ASCII string array, read from its Arrow buffer in one go."""
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=offset_type)
    offsets = offsets[array.offset : array.offset + len(array) + 1]
    return array.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]


def _codes(array: pa.Array) -> np.ndarray:
    """Unicode code points of the concatenated strings (any text)."""
    text = "".join(array.to_pylist())
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
