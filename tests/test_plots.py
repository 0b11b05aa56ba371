"""The shared accuracy figure (fedalign.report.plots) and the run folder's use of it."""

from __future__ import annotations

import matplotlib
import pytest
from matplotlib.figure import Figure

from fedalign.report.plots import Curve, accuracy_plot
from fedalign.report.results import plot_runs


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved, kept for inspection (the plot function closes them)."""
    figures = []
    save = Figure.savefig

    def keep(self, path, **kwargs):
        figures.append((self, kwargs))
        save(self, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_accuracy_plot_draws_accuracy_by_x_and_by_mib(tmp_path, drawn, monkeypatch):
    def switch(*args, **kwargs):
        raise AssertionError("fedalign switched matplotlib's backend")

    monkeypatch.setattr(matplotlib, "use", switch)  # a notebook's backend stays its own
    path = tmp_path / "acc.png"
    accuracy_plot(
        {
            "a": Curve([0, 1, 2], [0.0, 1.5, 3.0], [10.0, 50.0, 70.0]),
            "b": Curve([0, 2], [0.0, 6.0], [10.0, 40.0]),
        },
        path,
        x_label="communication rounds",
        title="t",
        dpi=50,
    )
    assert path.stat().st_size > 0
    ((fig, kwargs),) = drawn
    by_x, by_bytes = fig.axes
    assert _lines(by_x) == {"a": ([0, 1, 2], [10.0, 50.0, 70.0]), "b": ([0, 2], [10.0, 40.0])}
    assert _lines(by_bytes) == {
        "a": ([0.0, 1.5, 3.0], [10.0, 50.0, 70.0]),
        "b": ([0.0, 6.0], [10.0, 40.0]),
    }
    assert by_x.get_xlabel() == "communication rounds"
    assert by_bytes.get_xlabel() == "MiB communicated (down + up)"
    assert by_x.get_legend() is not None and by_bytes.get_legend() is None
    assert fig.get_suptitle() == "t" and kwargs["dpi"] == 50
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_curve_needs_one_value_of_each_per_point():
    with pytest.raises(ValueError, match="3, 2 and 3"):
        Curve([0, 1, 2], [0.0, 1.0], [1.0, 2.0, 3.0])


def test_run_plot_shows_evaluated_rounds_at_the_bytes_spent_by_then(tmp_path, drawn):
    rows = [
        {"round": 0, "test_accuracy": 0.25, "bytes_down": 0, "bytes_up": 0},
        {"round": 1, "bytes_down": 2**20, "bytes_up": 2**20},  # not evaluated
        {"round": 2, "test_accuracy": 0.5, "bytes_down": 2**20, "bytes_up": 2**19},
    ]
    plot_runs({"run": rows}, tmp_path / "accuracy.png")
    ((fig, kwargs),) = drawn
    by_round, by_bytes = fig.axes
    assert _lines(by_round) == {"run": ([0, 2], [25.0, 50.0])}
    assert _lines(by_bytes) == {"run": ([0.0, 3.5], [25.0, 50.0])}
    assert by_round.get_legend().get_texts()[0].get_fontsize() == 8 and kwargs["dpi"] == 120


def test_a_band_needs_both_bounds_with_one_value_per_point(tmp_path, drawn):
    with pytest.raises(ValueError, match="both its low and its high"):
        Curve([0, 1], [0.0, 1.0], [1.0, 2.0], low=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"per point \(2\), got 1 and 2"):
        Curve([0, 1], [0.0, 1.0], [1.0, 2.0], low=[0.5], high=[1.5, 2.5])
    band = Curve([0, 1], [0.0, 1.0], [1.0, 2.0], low=[0.5, 1.5], high=[1.5, 2.5])
    accuracy_plot(
        {"banded": band, "plain": Curve([0, 1], [0.0, 1.0], [3.0, 4.0])}, tmp_path / "b.png"
    )
    ((fig, _),) = drawn
    for ax in fig.axes:  # the banded curve's band, in its line's colour, in both panels
        (collection,) = ax.collections
        (line, _) = ax.lines
        assert collection.get_paths()[0].get_extents().y0 == pytest.approx(0.5)
        assert list(collection.get_facecolor()[0][:3]) == pytest.approx(
            list(matplotlib.colors.to_rgb(line.get_color()))
        )


def test_run_plot_has_a_title_whole_round_ticks_and_a_loss_panel(tmp_path, drawn):
    rows = [
        {"round": r, "test_accuracy": 0.2 * r, "test_loss": 2.0 - 0.5 * r, "bytes_down": 10}
        for r in range(3)
    ]
    plot_runs({"run": rows}, tmp_path / "accuracy.png", title="quickstart-20261206")
    ((fig, _),) = drawn
    by_round, _, by_loss = fig.axes
    assert fig._suptitle.get_text() == "quickstart-20261206"
    assert by_loss.get_ylabel() == "test loss"
    assert list(by_loss.lines[0].get_ydata()) == [2.0, 1.5, 1.0]
    fig.canvas.draw()
    for ax in (by_round, by_loss):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
