"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not, with strict validation.

Every header field is checked against the payload so that a truncated download or a file of the
wrong kind is reported by name (``DataError``) instead of surfacing as a reshape error deep in
training. The layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number
of dimensions, one big-endian uint32 per dimension, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

#: IDX type code -> numpy dtype (multi-byte types are big-endian on disk).
DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


def _raw_bytes(path: Path) -> bytes:
    """The file's IDX bytes; gzip is recognised by its magic bytes, whatever the file is called."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot be decompressed ({exc}); the gzip file is corrupted or truncated"
        ) from None


def decode_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array of the declared shape, in native byte order."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        found = raw[:4].hex() if raw else "an empty file"
        raise DataError(
            f"{name}: not an IDX file (wrong magic number: {found}, expected 00 00 <type> <ndim>)"
        )
    code, ndim = raw[2], raw[3]
    if code not in DTYPES:
        raise DataError(
            f"{name}: not an IDX file (wrong magic number {raw[:4].hex()}: unknown "
            f"type code 0x{code:02x}; known: {', '.join(f'0x{c:02x}' for c in DTYPES)})"
        )
    if ndim == 0:
        raise DataError(
            f"{name}: not an IDX file (wrong magic number {raw[:4].hex()}: 0 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{name}: truncated: expected a {header}-byte header for {ndim} dimensions, "
            f"got {len(raw)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"{name}: {kind}: expected {expected} bytes for shape {shape} "
            f"({dtype.name}), got {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (gzipped or raw) into a writable array of its declared shape."""
    path = Path(path)
    return decode_idx(_raw_bytes(path), str(path))
