"""The notebooks in docs/ run headless, top to bottom, in a fresh kernel: their own assertions
hold (the interpolation barrier falls with alignment; ``fedalign merge`` exits 0) and their figures
are drawn."""

import re

import nbformat
import pytest
from nbclient import NotebookClient

import fedalign
from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "docs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"


def test_the_merging_notebook_is_there():
    assert "merging.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_use_only_public_names(path):
    """A notebook is what a user copies: it imports ``fedalign`` itself, never its modules, and
    every ``fedalign.<name>`` it reads is in ``fedalign.__all__``."""
    code = "\n".join(
        cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    )
    assert not re.findall(r"(?:from|import) fedalign\.", code)
    used = set(re.findall(r"\bfedalign\.([A-Za-z_]+)", code)) - {"cli"}  # python -m fedalign.cli
    assert used and used <= set(fedalign.__all__), used - set(fedalign.__all__)
