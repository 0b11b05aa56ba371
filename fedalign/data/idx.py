"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not, with strict validation.

Every header field is checked against the payload so that a truncated download or a file of the
wrong kind is reported by name instead of surfacing as a reshape error deep in training.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (``.gz`` or raw) into an array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'IDX'} "
                        f"({exc}); the file is corrupted or truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (wrong magic number {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic {raw[:4].hex()}: type 0x{code:02x}, {ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"{path}: {kind}: expected {expected} bytes for shape {shape}, got {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
