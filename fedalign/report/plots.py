"""The accuracy figure every report draws: test accuracy against rounds and against bytes, and
the test loss against rounds where the curves carry it.

A run folder (``results``), a benchmark suite (``bench``) and the studies under ``simulations/``
all show the same two panels, so one function draws them and a change of style reaches all of
them. Callers turn their rows into ``Curve``s (they know what counts as a round and whether
seeds are averaged); nothing here reads run folders. matplotlib is imported when a figure is
drawn, not with the module: the server records runs without ever plotting in most processes.
Figures are made with matplotlib's object API (``Figure``, no pyplot), so drawing one needs no
display and never switches the backend of a notebook or script that imports fedalign.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Curve:
    """One line in both panels: ``x`` (rounds, or communication rounds), the MiB communicated by
    then, and the test accuracy in percent, point for point; ``low`` and ``high``, where given,
    bound a band around the accuracy (a suite's interval over seeds), drawn in the line's colour;
    ``loss``, where given, is the test loss at each point (a third panel)."""

    x: Sequence[float]
    mib: Sequence[float]
    accuracy: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    loss: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if not len(self.x) == len(self.mib) == len(self.accuracy):
            raise ValueError(
                f"a curve needs as many x, MiB and accuracy values, got "
                f"{len(self.x)}, {len(self.mib)} and {len(self.accuracy)}"
            )
        if (self.low is None) != (self.high is None):
            raise ValueError("a band needs both its low and its high bound")
        if self.low is not None and not len(self.low) == len(self.high) == len(self.x):
            raise ValueError(
                f"a band needs a low and a high value per point ({len(self.x)}), got "
                f"{len(self.low)} and {len(self.high)}"
            )
        if self.loss is not None and len(self.loss) != len(self.x):
            raise ValueError(
                f"a curve needs a loss per point ({len(self.x)}), got {len(self.loss)}"
            )


def accuracy_plot(
    curves: Mapping[str, Curve],
    path: str | Path,
    *,
    x_label: str = "round",
    y_label: str = "test accuracy (%)",
    title: str | None = None,
    legend_fontsize: float | None = None,
    dpi: int = 120,
) -> Figure:
    """Write ``path``: accuracy by ``x`` (left, with the legend) and by MiB (middle), one line per
    label of ``curves``, with its band where the curve has one, and the test loss by ``x``
    (right) when any curve carries it; rounds are whole numbers on their axis. Returns the
    figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with_loss = any(curve.loss is not None for curve in curves.values())
    fig = Figure(figsize=(16 if with_loss else 11, 4))
    axes = fig.subplots(1, 3 if with_loss else 2)
    by_x, by_bytes = axes[0], axes[1]
    for label, curve in curves.items():
        for ax, x in ((by_x, curve.x), (by_bytes, curve.mib)):
            (line,) = ax.plot(x, curve.accuracy, marker="o", markersize=3, label=label)
            if curve.low is not None:
                ax.fill_between(x, curve.low, curve.high, color=line.get_color(), alpha=0.2)
        if with_loss and curve.loss is not None:
            axes[2].plot(curve.x, curve.loss, marker="o", markersize=3, color=line.get_color())
    by_x.set_xlabel(x_label)
    by_bytes.set_xlabel("MiB communicated (down + up)")
    for ax in (by_x, by_bytes):
        ax.set_ylabel(y_label)
    if with_loss:
        axes[2].set_xlabel(x_label)
        axes[2].set_ylabel("test loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in (by_x, *axes[2:]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 2.5
    by_x.legend(fontsize=legend_fontsize)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)  # a PNG through Agg's canvas, whatever the session's backend
    return fig
