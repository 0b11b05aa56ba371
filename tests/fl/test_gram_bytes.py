"""The bytes a round with Grams costs, counted by the engine on the messages themselves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedalign.algorithms.fusion.regmean import GRAM_BUDGET
from tests.fl.mock_grid import IN_FEATURES, mock_clients, task_identity
from tests.fl.test_strategies import MLP, SIZES, make_config, run

NPY_HEADER = 128  # what Flower's serialisation adds to each array (numpy's .npy header)


@pytest.fixture(autouse=True)
def _flower_identity() -> Iterator[None]:
    with task_identity():
        yield


def _train_up(**aggregation: object) -> int:
    r = run(make_config(4, aggregation=aggregation), mock_clients(SIZES))
    return r.row["bytes_by_phase"]["train"]["up"]


def test_grams_add_what_their_packed_form_holds_to_each_train_reply():
    """Same clients, same training: the Grams add to each reply exactly their packed values plus
    one header per array. The 9 x 9 Gram of the 8-6-3 MLP's first layer goes as a rank-1 factor
    and its diagonal (18 values; the budget allows 24 = 0.5 x its 48 weights), or with
    ``gram_budget: null`` as its 45-value triangle."""
    fedavg = _train_up()
    packed = _train_up(align="weight", fuse="regmean") - fedavg
    exact = _train_up(align="weight", fuse="regmean", gram_budget=None) - fedavg
    n, weight_values = IN_FEATURES + 1, IN_FEATURES * MLP["hidden"][0]
    rank = int(GRAM_BUDGET * weight_values) // n - 1
    assert n * (rank + 1) <= GRAM_BUDGET * weight_values
    assert packed == len(SIZES) * (4 * n * (rank + 1) + 2 * NPY_HEADER)
    assert exact == len(SIZES) * (4 * n * (n + 1) // 2 + NPY_HEADER)
