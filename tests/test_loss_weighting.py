"""diffusion.loss_weighting "min-snr" (Hang et al. 2023): L_simple weighted per timestep so that, whatever the
network predicts, the loss is min(SNR_t, gamma) times the squared error of its x0 prediction."""

import numpy as np
import pytest
import torch

from ddpm.config import set_value, validate
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.presets import preset
from ddpm.schedules import make_betas

BETAS = make_betas("linear", 1000, 1e-4, 0.02)


def chain(mean_type="eps", weighting="min-snr", gamma=5.0, **kw):
    return GaussianDiffusion(BETAS, mean_type, loss_weighting=weighting, min_snr_gamma=gamma, **kw)


def test_the_weights_are_diffusers_min_snr_weights():
    """Against diffusers' compute_snr and the weighting of its train_text_to_image example."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    t = torch.arange(1000)
    snr = compute_snr(scheduler, t).double()
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    # (diffusers' schedule is float32: at t = 0, SNR ~ 1e4, it is 1.7e-4 off ours in float64)
    np.testing.assert_allclose(chain("eps").np["loss_weight"], clipped / snr, rtol=1e-3)
    np.testing.assert_allclose(chain("v").np["loss_weight"], clipped / (snr + 1), rtol=1e-3)
    np.testing.assert_allclose(chain("x0").np["loss_weight"], clipped, rtol=1e-3)
    # the clip binds only at low noise: SNR falls through gamma = 5 near t = 80 on the linear schedule
    weights = chain("eps").np["loss_weight"]
    assert weights[0] < 1e-3 and weights[-1] == 1.0 and np.all(np.diff(weights) >= 0)


class Fixed(torch.nn.Module):
    """A 'network' whose output is a fixed random tensor: the loss is a known function of it."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t):
        return self.output


@pytest.mark.parametrize("mean_type", ["eps", "v", "x0"])
def test_the_loss_is_min_snr_times_the_x0_error(mean_type):
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(6, 1, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 80, 200, 600, 999])
    diffusion = chain(mean_type)
    loss = diffusion.training_losses(Fixed(out), x0, t, noise)["loss"].double()
    # the x0 that the output stands for, by the published formulas, in float64
    ab = torch.from_numpy(diffusion.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    if mean_type == "eps":
        pred_x0 = (x_t - (1 - ab).sqrt() * out.double()) / ab.sqrt()
    elif mean_type == "v":
        pred_x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out.double()
    else:
        pred_x0 = out.double()
    snr = (ab / (1 - ab)).reshape(-1)
    expected = torch.minimum(snr, torch.tensor(5.0)) * ((pred_x0 - x0.double()) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=0)
    # the reported mse stays the plain one
    plain = GaussianDiffusion(BETAS, mean_type).training_losses(Fixed(out), x0, t, noise)
    torch.testing.assert_close(diffusion.training_losses(Fixed(out), x0, t, noise)["mse"], plain["loss"])


def test_none_is_the_paper_loss_and_respacing_keeps_the_weighting():
    g = torch.Generator().manual_seed(1)
    x0, noise, out = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([3, 50, 700])
    plain = GaussianDiffusion(BETAS).training_losses(Fixed(out), x0, t, noise)
    assert torch.equal(
        chain(weighting="none").training_losses(Fixed(out), x0, t, noise)["loss"], plain["loss"]
    )
    respaced = chain(gamma=2.0).respaced([0, 500, 999])
    assert respaced.loss_weighting == "min-snr" and respaced.min_snr_gamma == 2.0


def test_hybrid_weights_only_the_simple_term():
    g = torch.Generator().manual_seed(2)
    x0, noise = (torch.randn(2, 1, 2, 2, generator=g) for _ in range(2))
    out = torch.randn(2, 2, 2, 2, generator=g)
    t = torch.tensor([20, 900])
    kw = dict(var_type="learned_range", loss_type="hybrid")
    terms = chain("eps", **kw).training_losses(Fixed(out), x0, t, noise)
    weight = torch.from_numpy(chain("eps", **kw).np["loss_weight"]).float()[t]
    torch.testing.assert_close(terms["loss"], weight * terms["mse"] + terms["vb"])


def test_bad_weightings_are_refused():
    with pytest.raises(ConfigError, match="not the kl loss"):
        chain("eps", var_type="learned_range", loss_type="kl")
    with pytest.raises(ConfigError, match="not the kl loss or an xprev model"):
        chain("xprev")
    cfg = preset("fashion-mnist")
    set_value(cfg, "diffusion.loss_weighting", "snr")
    with pytest.raises(ConfigError, match="^diffusion.loss_weighting must be none or min-snr, got 'snr'$"):
        validate(cfg)
    cfg = preset("fashion-mnist")
    set_value(cfg, "diffusion.min_snr_gamma", "0")
    with pytest.raises(ConfigError, match="min_snr_gamma must be positive"):
        validate(cfg)
    set_value(cfg, "diffusion.min_snr_gamma", "1.5")
    set_value(cfg, "diffusion.loss_weighting", "min-snr")
    validate(cfg)
    from ddpm.build import build_diffusion

    built = build_diffusion(cfg)
    assert built.loss_weighting == "min-snr" and built.min_snr_gamma == 1.5
