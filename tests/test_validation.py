"""Client updates are checked before fusion: keys, shapes, dtypes, finiteness, norm."""

from collections import OrderedDict

import torch

from fedalign.validation import update_problem

REF = OrderedDict(w=torch.zeros(3, 2), b=torch.zeros(3), n=torch.tensor(0))


def _update(**changes):
    update = OrderedDict((k, v.clone()) for k, v in REF.items())
    update.update(changes)
    return update


def test_a_sound_update_passes():
    assert update_problem(REF, _update(w=torch.ones(3, 2))) is None


def test_each_defect_is_named():
    assert "missing keys ['b']" in update_problem(REF, OrderedDict(w=REF["w"], n=REF["n"]))
    assert "unexpected keys ['x']" in update_problem(REF, _update(x=torch.zeros(1)))
    assert "w: shape (2, 3), expected (3, 2)" in update_problem(REF, _update(w=torch.zeros(2, 3)))
    assert "w: dtype torch.float64" in update_problem(
        REF, _update(w=torch.zeros(3, 2, dtype=torch.float64))
    )
    nan = torch.zeros(3)
    nan[1] = float("nan")
    assert "b: contains NaN or Inf" in update_problem(REF, _update(b=nan))
    assert "contains NaN or Inf" in update_problem(REF, _update(b=torch.full((3,), float("inf"))))


def test_norm_bound():
    update = _update(w=torch.full((3, 2), 2.0))  # ||delta|| = sqrt(6 * 4) ~ 4.9
    assert update_problem(REF, update, max_norm=5.0) is None
    assert "exceeds max_update_norm=4" in update_problem(REF, update, max_norm=4.0)
