import pytest
import torch

from ddpm.losses import discretized_gaussian_log_likelihood


def test_decoder_likelihood_sums_to_one_over_bins():
    bins = torch.linspace(-1, 1, 256)[:, None]
    for mean, log_scale in ((0.1, -3.0), (-0.9, -1.0), (0.99, -5.0)):
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
