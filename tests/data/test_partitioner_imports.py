"""Partitioning imports flwr-datasets without its plotting helpers (seaborn, matplotlib's pyplot,
SciPy's statistics: 1.1 s of every run's start), and those still work when first used."""

from __future__ import annotations

from tests.helpers import fresh_python

PLOTTING = ("seaborn", "matplotlib.pyplot", "scipy.stats")


def test_partitioning_leaves_the_plotting_helpers_for_their_first_use() -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from fedalign.data.partition import partition\n"
        "parts = partition(np.repeat(np.arange(4), 25), 5, 'dirichlet', 0, alpha=0.5,"
        " min_partition_size=0)\n"
        f"print(sum(map(len, parts)), [m for m in {PLOTTING!r} if m in sys.modules])\n"
        "import flwr_datasets\n"
        "from flwr_datasets.visualization import plot_label_distributions\n"
        "module = sys.modules['flwr_datasets.visualization']\n"
        "print(callable(plot_label_distributions), 'seaborn' in sys.modules,"
        " flwr_datasets.visualization is module, type(module).__name__)\n"
    )
    assert fresh_python(code).splitlines() == ["100 []", "True True True module"]
