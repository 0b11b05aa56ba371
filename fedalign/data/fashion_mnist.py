"""Fashion-MNIST from its IDX files, found locally or downloaded (and verified) where a network
exists.

Looked up, in order: the ``data_dir`` argument, ``$FEDALIGN_DATA_DIR``, Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``), and the user cache
(``$XDG_CACHE_HOME/fedalign/fashion-mnist``, by default ``~/.cache/fedalign/fashion-mnist``). A
directory counts when it holds all four files, each gzipped (``*.gz``, the published form) or
already decompressed (same name without ``.gz``).

Checksums. Debian recompressed the archives (their gzip headers carry 2020-06-05), so the ``.gz``
bytes differ from Zalando's and their MD5s do not match the published ones; the decompressed IDX
payloads are byte-identical, though: their MD5s equal the ones Zalando-derived tools publish for
the raw files (``RAW_MD5``). A file is therefore accepted as genuine when either its ``.gz`` MD5 is
the published one (``OFFICIAL_GZ_MD5``: what a download from Zalando gives) or the SHA-256 of its
decompressed payload matches ``RAW_SHA256`` (measured on the Debian copies, whose raw MD5s match
``RAW_MD5``). Downloads are verified before they are renamed into place, so an interrupted or
tampered download never shadows a good copy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import socket
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .cache import cache_root, written_atomically
from .errors import DataError, DatasetNotFoundError
from .idx import read_idx

log = logging.getLogger(__name__)

FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
SIZES = {"train": 60_000, "test": 10_000}
NUM_CLASSES = 10
#: Bumped when what ``_decode`` returns changes: splits stored decoded before are then not read.
DECODED_FORMAT = 1
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: MD5 of the ``.gz`` files as Zalando publishes them (README of zalandoresearch/fashion-mnist).
OFFICIAL_GZ_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
#: MD5 of the decompressed IDX payloads (published for the raw files; equal on Debian's copies).
RAW_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
#: SHA-256 of the decompressed IDX payloads (measured on Debian's dataset-fashion-mnist 2020-06).
RAW_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SHA256 = RAW_SHA256  # the name earlier versions exported
#: Zalando's official locations, tried in order (both serve the same files).
MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CONNECT_TIMEOUT_S = 2.0
DOWNLOAD_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/fedalign/fashion-mnist`` (``~/.cache`` by default)."""
    return cache_root() / "fashion-mnist"


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The directories looked in, in order (empty settings skipped)."""
    dirs = [data_dir, os.environ.get("FEDALIGN_DATA_DIR"), DEBIAN_DIR, cache_dir()]
    return [Path(d).expanduser() for d in dirs if d]


def _file_in(directory: Path, name: str) -> Path | None:
    """``name`` (gzipped) or its decompressed twin in ``directory``, if present."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def network_available(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a mirror accepts a TCP connection within ``timeout`` seconds (no data is sent)."""
    for url in MIRRORS:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _digests(data: bytes) -> tuple[str, str]:
    """(MD5 of the bytes as given, SHA-256 of the IDX payload)."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), hashlib.sha256(raw).hexdigest()


def is_genuine(name: str, data: bytes) -> bool:
    """Whether ``data`` is the official ``name`` (published ``.gz`` MD5, or payload SHA-256)."""
    try:
        md5, sha = _digests(data)
    except (OSError, EOFError, zlib.error):  # not decompressible: certainly not the file
        return False
    return md5 == OFFICIAL_GZ_MD5[name] or sha == RAW_SHA256[name]


def verify_dir(directory: str | Path) -> dict[str, bool]:
    """File name -> whether the copy in ``directory`` is genuine (missing files give False)."""
    directory = Path(directory)
    result = {}
    for name in FILES.values():
        path = _file_in(directory, name)
        result[name] = path is not None and is_genuine(name, path.read_bytes())
    return result


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download(target: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch the missing files into ``target``; each is verified before it is moved into place."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        if _file_in(target, name) is not None:
            continue
        failures = []
        for base in MIRRORS:
            try:
                data = _fetch(base + name, timeout)
            except OSError as exc:
                failures.append(f"{base + name}: {exc}")
                continue
            if not is_genuine(name, data):
                failures.append(
                    f"{base + name}: checksum mismatch ({len(data)} bytes, md5 "
                    f"{hashlib.md5(data, usedforsecurity=False).hexdigest()})"
                )
                continue
            partial = target / (name + ".part")
            partial.write_bytes(data)
            partial.replace(target / name)
            break
        else:
            raise DataError(f"could not download {name}:\n  " + "\n  ".join(failures))
    return target


def prepare(to: str | Path) -> Path:
    """``fedalign data prepare fashion-mnist --to DIR``: the four files in ``DIR/fashion-mnist``,
    copied from a genuine local copy (Debian's, ``$FEDALIGN_DATA_DIR``, the cache) or downloaded
    and verified, for a machine without a network to be given as ``data.data_dir``."""
    target = Path(to).expanduser() / "fashion-mnist"
    found = next(
        (d for d in search_dirs() if all(_file_in(d, n) is not None for n in FILES.values())),
        None,
    )
    if found is None:
        if not network_available():
            raise DatasetNotFoundError(
                "Fashion-MNIST: no local copy to prepare from and no network to download it; "
                "install Debian's dataset-fashion-mnist or run this where "
                f"{urlsplit(MIRRORS[0]).hostname} is reachable"
            )
        return download(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        source = _file_in(found, name)
        data = source.read_bytes()
        if source.suffix != ".gz":  # store the published (gzipped) form
            data = gzip.compress(data, mtime=0)
        if not is_genuine(name, data):
            raise DataError(f"Fashion-MNIST: {source} fails its checksum; not copied")
        partial = target / (name + ".part")
        partial.write_bytes(data)
        partial.replace(target / name)
    return target


def locate(data_dir: str | Path | None = None) -> Path:
    """The first directory holding all four files; downloads into the cache if none does."""
    if data_dir is not None:  # chosen by the user: it holds the files, or it is an error
        d = Path(data_dir).expanduser()
        missing = [name for name in FILES.values() if _file_in(d, name) is None]
        if missing:
            raise DatasetNotFoundError(
                f"Fashion-MNIST: data_dir {str(data_dir)!r} lacks {', '.join(missing)}"
            )
        return d
    dirs = search_dirs(data_dir)
    for d in dirs:
        if all(_file_in(d, name) is not None for name in FILES.values()):
            return d
    if network_available():
        return download(cache_dir())
    looked = "\n  ".join(str(d) for d in dirs)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found; looked in:\n  " + looked + "\nand no network to download it. "
        "Install it with `apt install dataset-fashion-mnist`, or put the four files "
        f"{', '.join(FILES.values())} (gzipped or not; from {MIRRORS[0]}) in a directory and "
        "pass it as data_dir (config: data.data_dir) or set FEDALIGN_DATA_DIR."
    )


def decoded_dir() -> Path:
    """Where decoded splits are kept: ``$XDG_CACHE_HOME/fedalign/fashion-mnist-decoded``."""
    return cache_root() / "fashion-mnist-decoded"


def _decoded_stem(split: str, image_path: Path, label_path: Path) -> Path:
    """Where one split of these files is stored decoded: ``SPLIT-WHERE-WHAT``, WHERE a digest of
    the files' resolved paths and WHAT one of the format and of each file's inode, size,
    modification and change times. A copy that keeps the modification time (``cp -p``,
    ``tar x``) still has a new inode or change time, which no user can set, so another or a
    changed copy is decoded again; the split stored for the same paths before is then removed
    (``_store``)."""
    files = (image_path, label_path)
    paths = [str(path.resolve()) for path in files]
    times = [
        [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns] for st in map(Path.stat, files)
    ]
    where = hashlib.sha256(json.dumps(paths).encode()).hexdigest()[:16]
    what = hashlib.sha256(json.dumps([DECODED_FORMAT, times]).encode()).hexdigest()
    return decoded_dir() / f"{split}-{where}-{what}"


def _store(stem: Path, X: np.ndarray, y: np.ndarray) -> None:
    """Store a decoded split under ``stem``, then remove what was stored for the same files
    before they changed (or under an older format)."""
    for name, array in (("X", X), ("y", y)):
        with written_atomically(Path(f"{stem}-{name}.npy")) as f:
            np.save(f, array)
    split_where = stem.name.rsplit("-", 1)[0]
    for old in stem.parent.glob(f"{split_where}-*.npy"):
        if not old.name.startswith(f"{stem.name}-"):
            old.unlink(missing_ok=True)


def _read_decoded(stem: Path) -> tuple[np.ndarray, np.ndarray]:
    """The stored split, mapped copy-on-write (pages are read as they are used, and a write stays
    in the process that made it); raises ``ValueError`` (or what reading raised) when the files
    are not a decoded split."""
    X = np.load(f"{stem}-X.npy", mmap_mode="c", allow_pickle=False)
    y = np.load(f"{stem}-y.npy", allow_pickle=False)
    if X.dtype != np.float32 or X.ndim != 4 or X.shape[1:] != (1, 28, 28):
        raise ValueError(f"images {X.dtype} {X.shape}")
    if y.dtype != np.int64 or y.shape != (len(X),):
        raise ValueError(f"labels {y.dtype} {y.shape} for {len(X)} images")
    if not y.size or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError("no labels, or a label out of range")
    return X, y


@functools.lru_cache(maxsize=4)
def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split, decoded and checked once per copy of the files: later processes map the stored
    arrays (``decoded_dir``) instead of decompressing 26 MB and converting 47 M pixels, about
    0.5 s of CPU that a run's driver spent while Ray's workers start on the same cores
    (docs/benchmarks.md, issue 27). Stored arrays that fail their check are decoded again; a cache
    that cannot be written leaves the run as it was. Cached per process by resolved directory,
    so Ray workers decode once."""
    image_path = _file_in(directory, FILES[(split, "images")])
    label_path = _file_in(directory, FILES[(split, "labels")])
    if image_path is None or label_path is None:
        raise DatasetNotFoundError(f"{directory}: the Fashion-MNIST {split} files are missing")
    stem = _decoded_stem(split, image_path, label_path)
    try:
        return _read_decoded(stem)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 (whatever a bad file raises: it is decoded again)
        log.debug("decoded %s split %s not used (%r); decoding it again", split, stem, exc)
    X, y = _decode(image_path, label_path)
    try:
        _store(stem, X, y)
    except OSError as exc:
        log.debug("decoded %s split not stored in %s (%s)", split, stem.parent, exc)
    return X, y


def _decode(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one split's IDX files: float32 images in [0, 1], int64 labels."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"{image_path}: expected uint8 images of shape (n, 28, 28), got "
            f"{images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{label_path}: expected {len(images)} labels for {image_path.name}, got "
            f"shape {labels.shape}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{label_path}: label {int(labels.max())} is out of range 0..{NUM_CLASSES - 1}"
        )
    X = images[:, None, :, :].astype(np.float32)
    X /= 255.0
    return X, labels.astype(np.int64)


def load(split: str = "train", data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``X`` float32 (n, 1, 28, 28) in [0, 1] and ``y`` int64 (n,), cached per process.

    The arrays are shared by every caller in the process: index them (which copies), do not
    modify them in place.
    """
    if split not in SIZES:
        raise DataError(f"split must be one of {', '.join(SIZES)}, got {split!r}")
    return _read_split(locate(data_dir).resolve(), split)
