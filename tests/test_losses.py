import pytest
import torch

from ddpm.losses import discretized_gaussian_log_likelihood


def test_decoder_likelihood_sums_to_one_over_bins():
    bins = torch.linspace(-1, 1, 256)[:, None]
    for mean, log_scale in ((0.1, -3.0), (-0.9, -1.0), (0.99, -5.0)):
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_normal_kl_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    from ddpm.losses import normal_kl

    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_the_tanh_cdf_is_within_2e4_of_the_exact_one():
    import math

    from ddpm.losses import approx_standard_normal_cdf

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4


def test_mean_flat_averages_all_but_the_batch():
    from ddpm.losses import mean_flat

    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
