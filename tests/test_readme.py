"""The README's Python blocks run as written (in a fresh folder, in one namespace, in order): a
user who copies them gets what the README says, not a NameError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedalign.algorithms.fusion import FUSE_RULES
from fedalign.core.registry import STRATEGIES
from fedalign.data import DATASETS
from fedalign.models import MODELS

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readmes_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has Python examples"
    monkeypatch.chdir(tmp_path)
    names = [(MODELS, "tiny"), (DATASETS, "blobs"), (FUSE_RULES, "winsorized")]
    names.append((STRATEGIES, "boost-avg"))
    try:
        namespace: dict = {"__name__": "readme"}
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    finally:
        for registry, name in names:
            registry.unregister(name)
    accuracy, run_dir = capsys.readouterr().out.strip().splitlines()[-1].split(" in ")
    assert (tmp_path / run_dir / "summary.json").is_file()
    assert float(accuracy.rstrip("%")) > 50  # blobs 4 apart: a working run separates them


@pytest.mark.parametrize("block", python_blocks())
def test_every_block_is_valid_python(block):
    compile(block, str(README), "exec")


QUICKSTART = README.parent / "docs" / "results" / "quickstart"


def test_the_readmes_demo_numbers_are_the_recorded_runs():
    """The round line and the final line the README shows are what the quickstart's recorded run
    (docs/results/quickstart) prints: regenerate both when the quickstart changes."""
    from fedalign.runs.progress import round_line

    text = README.read_text()
    rows = [json.loads(line) for line in (QUICKSTART / "metrics.jsonl").read_text().splitlines()]
    assert round_line(rows[3], len(rows) - 1) in text
    summary = json.loads((QUICKSTART / "summary.json").read_text())
    final = f"final test accuracy: {summary['final_accuracy']:.2%} (best "
    assert final in text
    assert f"{summary['wall_seconds']} s" in text
