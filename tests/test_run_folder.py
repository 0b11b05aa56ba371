"""Run folders: several runs of one name started in the same second each get their own folder."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedalign.core.errors import ConfigError
from fedalign.runs.folder import create_run_dir


def test_simultaneous_runs_of_one_name_get_distinct_folders(tmp_path: Path) -> None:
    workers = 8
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        barrier = threading.Barrier(workers)

        def start(_: int, out: Path = out, barrier: threading.Barrier = barrier) -> Path:
            barrier.wait()
            return create_run_dir(out, "sweep")

        with ThreadPoolExecutor(workers) as pool:
            made = list(pool.map(start, range(workers)))
        assert len(set(made)) == workers
        assert all(p.is_dir() and p.parent == out for p in made)


def test_an_output_that_is_a_file_is_one_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create a run folder"):
        create_run_dir(blocker, "run")
