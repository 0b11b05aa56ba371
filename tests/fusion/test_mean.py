"""FedAvg's weighted mean: float64 accumulation, integer buffers, bad weights."""

import pytest
import torch

from fedalign.core.tensors import weighted_average


def test_weighted_mean_of_floats_and_max_of_counters():
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(4, 3, generator=g), "n": torch.tensor(k, dtype=torch.long)}
        for k in (3, 7, 5)
    ]
    fused = weighted_average(states, [1.0, 2.0, 1.0])
    expected = (states[0]["w"].double() + 2 * states[1]["w"].double() + states[2]["w"].double()) / 4
    torch.testing.assert_close(fused["w"], expected.float())
    assert fused["w"].dtype == torch.float32 and int(fused["n"]) == 7
    big = [{"w": torch.full((2,), 1e8 + k)} for k in range(4)]  # float32 sums would round
    assert float(weighted_average(big)["w"][0]) == pytest.approx(1e8 + 1.5, abs=8)
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_average(states, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="got 2 weights for 3"):
        weighted_average(states, [1.0, 1.0])
