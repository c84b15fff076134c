"""The random stand-ins' sparsity: JumpReLU thresholds set from quantiles of the pre-activations."""

import pytest
import torch

from corrsteer_pl.models.tiny import firing_thresholds


@pytest.mark.parametrize(("positions", "rate"), [(1000, 0.1), (37, 0.1), (5, 0.5), (2000, 0.03)])
def test_one_rate_gives_torch_quantile_exactly(positions, rate):
    pre = torch.randn(positions, 64, generator=torch.Generator().manual_seed(positions))
    assert torch.equal(firing_thresholds(pre, rate), torch.quantile(pre, 1 - rate, dim=0))


def test_each_feature_fires_on_its_own_rate():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(5000, 300, generator=g)  # (positions, d_sae)
    rate = 0.01 + 0.02 * torch.rand(300, generator=g)  # (d_sae,)
    fired = (pre > firing_thresholds(pre, rate)).float().mean(dim=0)
    torch.testing.assert_close(fired, rate, atol=2e-4, rtol=0)
