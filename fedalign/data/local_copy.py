"""Local copies of Hugging Face datasets: where they are looked for, how they are read, and the one
download (``fedalign data prepare``) where a network exists.

A dataset ``NAME`` (folder name: ``NAME``, or ``ORG--REPO`` for ``hf:ORG/REPO``) is looked for,
in order, in

1. ``data_dir/NAME`` and ``data_dir`` itself (``data_dir``: the config's ``data.data_dir``);
2. ``$FEDALIGN_DATA_DIR/NAME`` (one root for every dataset; Fashion-MNIST's four files sit
   directly in it);
3. ``$XDG_CACHE_HOME/fedalign/NAME`` (default ``~/.cache/fedalign/NAME``: where a run downloads
   to when it must);
4. the Hugging Face hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``): the files
   ``datasets.load_dataset(REPO)`` downloaded there.

A copy is a ``save_to_disk`` folder (a ``DatasetDict`` or a single ``Dataset``, which counts as
the training split), or a folder of ``.parquet`` / ``.csv`` files (at most three levels down,
as in the hub's layouts): a file whose path has a part starting with ``test`` belongs to the
test split, one starting with ``val`` is skipped, every other file to the training split.

Nothing here touches the network unless no copy is found and neither ``HF_HUB_OFFLINE`` nor
``HF_DATASETS_OFFLINE`` is set; then the hub host gets one TCP connection attempt of
``CONNECT_TIMEOUT_S`` seconds before anything is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pyarrow as pa

from .cache import cache_root
from .errors import DataError, DatasetNotFoundError

ENV_DATA_DIR = "FEDALIGN_DATA_DIR"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_HOST = ("huggingface.co", 443)
CONNECT_TIMEOUT_S = 2.0
DATA_SUFFIXES = (".parquet", ".csv")
MAX_DEPTH = 3


def hub_cache() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot of dataset ``repo`` (the one ``refs/main`` names, else the newest)."""
    base = hub_cache() / f"datasets--{repo.replace('/', '--')}"
    ref = base / "refs" / "main"
    if ref.is_file() and (base / "snapshots" / ref.read_text().strip()).is_dir():
        return base / "snapshots" / ref.read_text().strip()
    snapshots = sorted((base / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def offline_setting() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or the datasets twin) when the environment forbids the network."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether the hub accepts a TCP connection within ``timeout`` seconds (no data is sent)."""
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def no_network_reason() -> str | None:
    """Why nothing can be downloaded here (None: the hub is reachable)."""
    setting = offline_setting()
    if setting:
        return f"{setting} is set"
    if not hub_reachable():
        return f"{HUB_HOST[0]} is unreachable"
    return None


def _data_files(directory: Path) -> list[Path]:
    files = []
    for depth in range(MAX_DEPTH):
        pattern = "/".join(["*"] * (depth + 1))
        files += [p for p in directory.glob(pattern) if p.suffix in DATA_SUFFIXES and p.is_file()]
    return sorted(files)


def is_copy(directory: Path) -> bool:
    """Whether ``directory`` holds a dataset copy in one of the forms this module reads."""
    if not directory.is_dir():
        return False
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        return True
    return bool(_data_files(directory))


def candidates(folder: str, repo: str, data_dir: str | Path | None) -> list[Path]:
    """The places looked in, in order (see the module docstring)."""
    places: list[Path] = []
    if data_dir is not None:
        places += [Path(data_dir).expanduser() / folder, Path(data_dir).expanduser()]
    if os.environ.get(ENV_DATA_DIR):
        places.append(Path(os.environ[ENV_DATA_DIR]).expanduser() / folder)
    places.append(cache_root() / folder)
    snapshot = hub_snapshot(repo)
    if snapshot is not None:
        places.append(snapshot)
    return places


def find(folder: str, repo: str, data_dir: str | Path | None) -> Path | None:
    """The first copy of the dataset among ``candidates`` (None: there is none)."""
    return next((p for p in candidates(folder, repo, data_dir) if is_copy(p)), None)


def missing_message(name: str, folder: str, repo: str, data_dir: str | Path | None) -> str:
    """One line: where fedalign looked and what to download, where to put it."""
    looked = [str(p) for p in candidates(folder, repo, data_dir)]
    if hub_snapshot(repo) is None:
        looked.append(f"the Hugging Face cache {hub_cache()}")
    return (
        f"{name}: no local copy (looked in {', '.join(looked)}) and no network to download it "
        f"({no_network_reason() or 'download failed'}); where a network exists run "
        f"`fedalign data prepare {name} --to DIR` (Hugging Face dataset {repo}), copy "
        f"DIR/{folder} to this machine and point data.data_dir or {ENV_DATA_DIR} at its parent"
    )


def locate(name: str, folder: str, repo: str, data_dir: str | Path | None) -> Path:
    """The dataset's copy; downloaded into fedalign's cache if there is none and the hub can be
    reached, else ``DatasetNotFoundError`` with one line saying what to do."""
    found = find(folder, repo, data_dir)
    if found is not None:
        return found
    if no_network_reason() is not None:
        raise DatasetNotFoundError(missing_message(name, folder, repo, data_dir))
    return prepare(name, folder, repo, cache_root())


def prepare(name: str, folder: str, repo: str, to: str | Path) -> Path:
    """Download ``repo`` from the hub and store it as a ``save_to_disk`` folder ``to/folder``.

    Written under a temporary name and renamed when complete, so an interrupted download never
    passes for a copy.
    """
    reason = no_network_reason()
    if reason is not None:
        raise DatasetNotFoundError(
            f"{name}: cannot download the Hugging Face dataset {repo} here ({reason}); run "
            f"`fedalign data prepare {name} --to DIR` on a machine that reaches {HUB_HOST[0]}"
        )
    import datasets

    target = Path(to).expanduser() / folder
    if is_copy(target):
        return target
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        loaded = datasets.load_dataset(repo)
    except (OSError, ValueError, RuntimeError) as exc:  # network, hub and format errors
        raise DataError(f"{name}: downloading {repo} failed: {exc}") from None
    loaded.save_to_disk(str(partial))
    partial.replace(target)
    return target


# ---- reading a copy ---------------------------------------------------------------------------


def _split_of(path: Path, directory: Path) -> str | None:
    parts = [p.lower() for p in path.relative_to(directory).parts]
    if any(p.startswith("test") for p in parts):
        return "test"
    if any(p.startswith("val") for p in parts):
        return None
    return "train"


def _read_file(path: Path, text_columns: tuple[str, ...]) -> pa.Table:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    import pyarrow.csv as pcsv

    return pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in text_columns}, strings_can_be_null=False
        ),
    )


def read(directory: Path, text_columns: tuple[str, ...] = ()) -> dict[str, pa.Table]:
    """The copy's splits as Arrow tables (``train``, and ``test`` when the copy has one).

    ``text_columns`` are read as strings from CSV files (``"1"`` stays a character, not a number).
    The tables keep the ``datasets`` feature metadata (class names) when the copy has it.
    """
    try:
        if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(directory))
            if isinstance(loaded, datasets.Dataset):
                loaded = {"train": loaded}
            tables = {}
            for split, ds in loaded.items():
                key = "test" if split.startswith("test") else "train" if split == "train" else None
                if key is not None:
                    tables[key] = _with_features(ds.data.table, ds.features)
            return tables
        groups: dict[str, list[pa.Table]] = {}
        for path in _data_files(directory):
            split = _split_of(path, directory)
            if split is not None:
                groups.setdefault(split, []).append(_read_file(path, text_columns))
        return {
            split: pa.concat_tables(parts, promote_options="default")
            for split, parts in groups.items()
        }
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataError(f"{directory}: cannot read the dataset copy: {exc}") from None


def _with_features(table: pa.Table, features) -> pa.Table:
    """``table`` with ``features`` in its schema metadata (as a parquet copy carries them)."""
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **features.arrow_schema.metadata}
    )
