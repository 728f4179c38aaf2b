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


# ---- diffusion.timestep_sampling "lognormal": EDM's noise-level distribution on the discrete chain ----


def log_sigmas(diffusion):
    ab = diffusion.alphas_cumprod
    return 0.5 * np.log((1 - ab) / ab)


def test_lognormal_timesteps_are_the_nearest_in_log_sigma_with_edms_probabilities():
    import math

    from ddpm.diffusion import lognormal_timesteps

    d = GaussianDiffusion(BETAS)
    levels = log_sigmas(d)
    g = torch.Generator().manual_seed(0)
    t = lognormal_timesteps(d.alphas_cumprod, 1000, g, -1.2, 1.2)
    # the same normal draws, taken to the nearest level by brute force
    drawn = -1.2 + 1.2 * torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nearest = np.abs(drawn.numpy()[:, None] - levels[None, :]).argmin(1)
    np.testing.assert_array_equal(t.numpy(), nearest)
    # frequencies against the normal's mass between the midpoints, in 12 bins of timesteps
    n = 400_000
    t = lognormal_timesteps(d.alphas_cumprod, n, torch.Generator().manual_seed(1), -1.2, 1.2).numpy()
    edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
    cdf = np.array([0.5 * (1 + math.erf((e + 1.2) / (1.2 * math.sqrt(2)))) for e in edges])
    mass = np.diff(cdf)  # P(t) for each of the 1000 timesteps
    bins = np.array_split(np.arange(1000), 12)
    for b in bins:
        p = mass[b].sum()
        seen = np.isin(t, b).mean()
        assert abs(seen - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (b[0], seen, p)
    # EDM's median sigma e^-1.2 = 0.30 is abar = 0.917: t = 89 on the linear schedule
    assert abs(np.median(t) - np.abs(levels - -1.2).argmin()) <= 2


def test_edm_preconditioning_with_sigma_data_1_is_v_prediction():
    """EDM's loss lambda(sigma) |D(x) - x0|^2 with D = c_skip x + c_out F, sigma_data = 1 (Karras et al.
    2022, Table 1), equals the plain MSE of a v-predicting network with F = -v, at every t: so
    mean_type v with lognormal timesteps is EDM's recipe (sigma_data = 1) on this chain."""
    g = torch.Generator().manual_seed(3)
    x0, noise, out = (torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 40, 89, 500, 999])
    d = GaussianDiffusion(BETAS, "v")
    mse = d.training_losses(Fixed(out.float()), x0.float(), t, noise.float())["loss"].double()
    ab = torch.from_numpy(d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    sigma = ((1 - ab) / ab).sqrt()
    x = x0 + sigma * noise  # EDM's x: x_t / sqrt(abar)
    c_skip, c_out = 1 / (sigma**2 + 1), sigma / (sigma**2 + 1).sqrt()
    D = c_skip * x + c_out * -out
    weight = (sigma**2 + 1) / sigma**2
    edm = (weight * (D - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(mse, edm, rtol=1e-4, atol=1e-6)


def test_the_trainer_draws_lognormal_timesteps_and_bad_values_are_refused(idx_dir):
    from conftest import tiny_config

    from ddpm.train import Trainer

    cfg = tiny_config(idx_dir)
    cfg.diffusion.timestep_sampling = "lognormal"
    chain = GaussianDiffusion(make_betas("linear", 50, 1e-4, 0.02))  # the tiny config's 50 steps
    cfg.diffusion.lognormal_mean, cfg.diffusion.lognormal_std = float(log_sigmas(chain)[20]), 1e-9
    trainer = Trainer(cfg, idx_dir.parent / "run", progress=False)
    batch = trainer.task.batch(0, torch.Generator().manual_seed(0))
    assert batch.t.tolist() == [20] * len(batch.t)
    for key, value, message in (
        ("diffusion.timestep_sampling", "beta", "must be uniform or lognormal, got 'beta'"),
        ("diffusion.lognormal_std", "0", "lognormal_std positive"),
        ("diffusion.lognormal_mean", "-101", "diffusion.lognormal_mean must be >= -100"),
    ):
        bad = preset("fashion-mnist")
        set_value(bad, key, value)
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    good = preset("fashion-mnist")
    set_value(good, "diffusion.timestep_sampling", "lognormal")
    set_value(good, "diffusion.lognormal_mean", "-1.2")
    validate(good)
