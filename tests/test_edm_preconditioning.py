"""diffusion.mean_type "edm": EDM's preconditioning (Karras et al. 2022, Table 1) on the variance-preserving
chain, checked against the published formulas computed here in EDM's own variables (x = x0 + sigma n)."""

import numpy as np
import pytest
import torch

from ddpm.config import set_value, validate
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.presets import preset
from ddpm.schedules import make_betas

BETAS = make_betas("linear", 1000, 1e-4, 0.02)
T = torch.tensor([0, 10, 80, 200, 600, 999])


class Recording(torch.nn.Module):
    """Returns a fixed output and keeps what it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output, self.inputs = output, []

    def forward(self, x, t):
        self.inputs.append(x)
        return self.output


def edm_table_1(sigma, sigma_data):
    """c_skip, c_out, c_in and lambda as Table 1 of Karras et al. writes them."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip, c_out, c_in = d2 / (s2 + d2), sigma * sigma_data / (s2 + d2) ** 0.5, 1 / (s2 + d2) ** 0.5
    return c_skip, c_out, c_in, (s2 + d2) / (sigma * sigma_data) ** 2


@pytest.mark.parametrize("sigma_data", [0.5, 0.66])
def test_network_input_output_and_loss_are_edms(sigma_data):
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    d = GaussianDiffusion(BETAS, "edm", sigma_data=sigma_data)
    ab = torch.from_numpy(d.alphas_cumprod)[T].reshape(-1, 1, 1, 1)
    sigma = ((1 - ab) / ab).sqrt()
    c_skip, c_out, c_in, lam = edm_table_1(sigma, sigma_data)
    x = x0 + sigma * noise  # EDM's noisy image
    x_t = d.q_sample(x0.float(), T, noise.float())
    torch.testing.assert_close(x_t.double(), ab.sqrt() * x, rtol=1e-5, atol=1e-6)

    network = Recording(out.float())
    losses = d.training_losses(network, x0.float(), T, noise.float())
    torch.testing.assert_close(network.inputs[0].double(), c_in * x, rtol=1e-5, atol=1e-5)  # F(c_in x)
    denoised = c_skip * x + c_out * out  # D(x)
    # the loss is EDM's lambda(sigma) ||D(x) - x0||^2
    expected = lam.reshape(-1) * ((denoised - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(losses["loss"].double(), expected, rtol=1e-4, atol=0)
    # and sampling uses D as the x0 prediction
    pred_x0 = d.p_mean_variance(out.float(), x_t, T, clip_denoised=False).pred_x0
    torch.testing.assert_close(pred_x0.double(), denoised, rtol=1e-4, atol=1e-4)
    network.inputs.clear()
    d.predict(network, x_t, T, clip_denoised=False)
    torch.testing.assert_close(network.inputs[0].double(), c_in * x, rtol=1e-5, atol=1e-5)


def test_sigma_data_one_is_v_prediction():
    """With sigma_data = 1 EDM's F is -v and its input factor is 1 on a variance-preserving chain."""
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(6, 1, 3, 3, generator=g) for _ in range(2))
    edm = GaussianDiffusion(BETAS, "edm", sigma_data=1.0)
    v = GaussianDiffusion(BETAS, "v")
    torch.testing.assert_close(edm.edm_target(x0, T, noise), -v.v_target(x0, T, noise), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(edm.np["edm_c_in"], 1.0, rtol=1e-12)
    x_t = v.q_sample(x0, T, noise)
    out = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(edm.pred_x0_from_edm(x_t, T, -out), v.pred_x0_from_v(x_t, T, out))


def test_min_snr_weights_the_x0_error_and_respacing_keeps_sigma_data():
    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(6, 1, 4, 4, generator=g) for _ in range(3))
    d = GaussianDiffusion(BETAS, "edm", loss_weighting="min-snr", sigma_data=0.5)
    loss = d.training_losses(Recording(out), x0, T, noise)["loss"].double()
    ab = torch.from_numpy(d.alphas_cumprod)[T].reshape(-1, 1, 1, 1)
    x_t = d.q_sample(x0, T, noise)
    pred_x0 = d.p_mean_variance(out, x_t, T, clip_denoised=False).pred_x0.double()
    snr = (ab / (1 - ab)).reshape(-1)
    expected = torch.minimum(snr, torch.tensor(5.0)) * ((pred_x0 - x0.double()) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    respaced = d.respaced(10)
    assert respaced.sigma_data == 0.5
    np.testing.assert_allclose(respaced.np["edm_c_skip"], d.np["edm_c_skip"][respaced.timestep_map])


def test_bad_sigma_data_is_refused():
    for bad in ("0", "-1", "nan", "inf"):
        cfg = preset("fashion-mnist")
        set_value(cfg, "diffusion.sigma_data", bad)
        with pytest.raises(ConfigError, match="diffusion.sigma_data must be"):
            validate(cfg)
    with pytest.raises(ConfigError, match="sigma_data must be positive"):
        GaussianDiffusion(BETAS, "edm", sigma_data=0.0)
