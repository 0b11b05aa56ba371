"""Fashion-MNIST from its gzipped IDX files, found locally or downloaded where a network exists.

Looked up, in order: the ``data_dir`` argument, ``$FEDALIGN_DATA_DIR``, Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``), and the user cache
(``$XDG_CACHE_HOME/fedalign/fashion-mnist``). Downloads go to the cache and are verified against the
SHA-256 of the decompressed files (Debian recompresses the archives, so the ``.gz`` bytes differ
while the data is identical).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import socket
import urllib.request
from pathlib import Path

import numpy as np

from .errors import DataError, DatasetNotFoundError
from .idx import read_idx

FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
# SHA-256 of the decompressed IDX payloads (measured on Debian's dataset-fashion-mnist).
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedalign" / "fashion-mnist"


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    dirs = [data_dir, os.environ.get("FEDALIGN_DATA_DIR"), DEBIAN_DIR, cache_dir()]
    return [Path(d).expanduser() for d in dirs if d]


def network_available(host: str = "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
                      timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 80), timeout=timeout):
            return True
    except OSError:
        return False


def _verify(path: Path) -> None:
    digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    if digest != SHA256[path.name]:
        path.unlink()
        raise DataError(f"{path.name}: checksum mismatch after download (got {digest[:12]}...)")


def download(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        path = target / name
        if path.exists():
            continue
        partial = path.with_suffix(".part")
        urllib.request.urlretrieve(URL + name, partial)  # noqa: S310 (fixed https/http host)
        partial.rename(path)
        _verify(path)


def locate(data_dir: str | Path | None = None) -> Path:
    """The first directory holding all four files; downloads into the cache if none does."""
    dirs = search_dirs(data_dir)
    for d in dirs:
        if all((d / name).is_file() for name in FILES.values()):
            return d
    if network_available():
        download(cache_dir())
        return cache_dir()
    looked = "\n  ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found; looked in:\n  " + looked + "\nand no network to download it. "
        "Install it with `apt install dataset-fashion-mnist`, or put the four "
        f"{', '.join(FILES.values())} files in a directory and pass data.data_dir "
        "(or set FEDALIGN_DATA_DIR)."
    )


@functools.lru_cache(maxsize=4)
def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(directory / FILES[(split, "images")])
    labels = read_idx(directory / FILES[(split, "labels")])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{directory}: {split} images {images.shape} and labels {labels.shape} "
                        "do not belong together")
    X = (images.astype(np.float32) / 255.0)[:, None, :, :]
    y = labels.astype(np.int64)
    return X, y


def load(split: str = "train", data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``X`` float32 (n, 1, 28, 28) in [0, 1] and ``y`` int64 (n,); cached per process."""
    return _read_split(locate(data_dir).resolve(), split)
