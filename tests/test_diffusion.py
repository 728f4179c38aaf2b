import math

import numpy as np
import pytest
import torch
from conftest import linear

from ddpm.diffusion import space_timesteps
from ddpm.errors import ConfigError
from ddpm.losses import discretized_gaussian_log_likelihood


def test_closed_form_matches_markov_chain():
    """q(x_t | x_0) in closed form (Eq. 4) equals t steps of q(x_t | x_{t-1}) in mean and variance."""
    d = linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    checkpoints = {10, 100, 500, 999}
    for k in range(1000):
        beta = d.betas[k]
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if k in checkpoints:
            t = torch.tensor([k])
            mean, var, logvar = d.q_mean_variance(x0[:1].float().reshape(1, 1), t)
            assert x.mean().item() == pytest.approx(mean.item(), abs=4 * math.sqrt(var.item() / x.numel()))
            assert x.var().item() == pytest.approx(var.item(), rel=0.01)
            assert logvar.item() == pytest.approx(math.log(1 - d.alphas_cumprod[k]), rel=1e-5)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from Eqs. 6-7 equals q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised on a grid."""
    d = linear()
    x0, xt = 0.3, -0.4
    for k in (1, 5, 50, 400, 999):
        beta, ab_prev = d.betas[k], d.alphas_cumprod[k - 1]
        grid = np.linspace(-6, 6, 400_001)
        log_lik = -((xt - math.sqrt(1 - beta) * grid) ** 2) / (2 * beta)
        log_prior = -((grid - math.sqrt(ab_prev) * x0) ** 2) / (2 * (1 - ab_prev))
        w = np.exp(log_lik + log_prior - (log_lik + log_prior).max())
        w /= w.sum()
        mean_num = (w * grid).sum()
        var_num = (w * (grid - mean_num) ** 2).sum()
        t = torch.tensor([k])
        mean, var, _ = d.q_posterior(torch.tensor([[x0]]), torch.tensor([[xt]]), t)
        assert mean.item() == pytest.approx(mean_num, abs=1e-5)
        assert var.item() == pytest.approx(var_num, rel=1e-3)


def test_posterior_variance_rules():
    d = linear()
    pv = d.np["posterior_variance"]
    assert pv[0] == 0.0
    assert d.np["posterior_log_variance_clipped"][0] == math.log(pv[1])
    # fixed large: beta_t for t > 0, but beta-tilde_1 at t = 0
    assert d.np["fixed_large_variance"][0] == pv[1]
    assert np.array_equal(d.np["fixed_large_variance"][1:], d.betas[1:])


def test_q_sample_matches_diffusers():
    from diffusers import DDPMScheduler

    d = linear()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    ours = d.q_sample(x0, t, noise)
    theirs = sched.add_noise(x0, noise, t)
    # diffusers takes square roots in float32; ours come from float64, hence the 1e-5 tolerance.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_eps_mean_without_clipping_is_eq11():
    d = linear()
    g = torch.Generator().manual_seed(4)
    x_t, eps = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    t = torch.tensor([5, 300, 999])
    out = d.p_mean_variance(eps, x_t, t, clip_denoised=False)
    beta = torch.tensor(d.betas[t.numpy()]).float()[:, None]
    ab = torch.tensor(d.alphas_cumprod[t.numpy()]).float()[:, None]
    eq11 = (x_t - beta / torch.sqrt(1 - ab) * eps) / torch.sqrt(1 - beta)
    torch.testing.assert_close(out.mean, eq11, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "xprev", "v", "edm"])
def test_parameterisations_agree(mean_type):
    """Each parameterisation, fed the exact target for the same (x0, eps), gives the true posterior mean."""
    d = linear(mean_type=mean_type)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 1, 3, 3, generator=g) * 1.8 - 0.9
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 10, 400, 999])
    x_t = d.q_sample(x0, t, eps)
    target = {
        "eps": eps,
        "x0": x0,
        "xprev": d.q_posterior(x0, x_t, t)[0],
        "v": d.v_target(x0, t, eps),
        "edm": d.edm_target(x0, t, eps),
    }[mean_type]
    out = d.p_mean_variance(target, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out.mean, d.q_posterior(x0, x_t, t)[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out.pred_x0, x0, rtol=1e-3, atol=2e-3)
    losses = d.training_losses(lambda x, t_: target, x0, t, eps)
    assert losses["loss"].abs().max() < 1e-8


def test_respacing_keeps_alphabar_and_maps_timesteps():
    d = linear()
    r = d.respaced(10)
    kept = space_timesteps(1000, 10)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 10
    assert np.allclose(r.alphas_cumprod, d.alphas_cumprod[kept])
    assert list(r.timestep_map) == kept
    seen = []
    r.p_sample_loop(lambda x, t: (seen.append(int(t[0])), torch.zeros_like(x))[1], (1, 1))
    assert seen == kept[::-1]


def test_prior_term_is_tiny_for_linear_schedule():
    d = linear()
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    prior = d.prior_bpd(x0)
    assert prior.max().item() < 5e-5 and prior.min().item() > 0


def test_vb_terms_match_an_independent_kl_and_decoder():
    """L_t for t > 0 is KL(q(x_{t-1}|x_t,x0) || p_theta) in bits/dim (checked against torch.distributions);
    at t = 0 it is the discretised decoder NLL."""
    from torch.distributions import Normal, kl_divergence

    d = linear(var_type="fixedlarge")
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).float() / 127.5 - 1
    eps_hat = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 700])
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    vb, _ = d.vb_terms_bpd(eps_hat, x0, x_t, t, clip_denoised=False)
    out = d.p_mean_variance(eps_hat, x_t, t, clip_denoised=False)
    true_mean, true_var, _ = d.q_posterior(x0, x_t, t)
    for i in (1, 2):
        kl = kl_divergence(
            Normal(true_mean[i], true_var[i].sqrt()), Normal(out.mean[i], out.variance[i].sqrt())
        )
        assert vb[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-3)
    nll = -discretized_gaussian_log_likelihood(x0[0], out.mean[0], 0.5 * out.log_variance[0])
    assert vb[0].item() == pytest.approx(nll.mean().item() / math.log(2), rel=1e-5)


def test_kl_loss_is_the_bound_term():
    d = linear(loss_type="kl")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([3, 500])
    eps_hat = torch.randn_like(x0)
    loss = d.training_losses(lambda x, t_: eps_hat, x0, t, noise)["loss"]
    expected, _ = d.vb_terms_bpd(eps_hat, x0, d.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(loss, expected)


def test_learned_variance_needs_a_bound_loss():
    with pytest.raises(ConfigError):
        linear(var_type="learned", loss_type="mse")
    with pytest.raises(ConfigError, match="hybrid"):
        linear(var_type="fixedlarge", loss_type="hybrid")
    with pytest.raises(ConfigError):
        linear(mean_type="score")


def test_hybrid_loss_trains_variance_only_through_vb():
    d = linear(var_type="learned_range", loss_type="hybrid")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    out = torch.zeros(2, 2, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, t: out, x0, torch.tensor([3, 700]), noise)
    assert set(losses) == {"loss", "mse", "vb"}
    losses["vb"].sum().backward()
    assert out.grad[:, :1].abs().max() == 0  # the mean half is detached from the bound
    assert out.grad[:, 1:].abs().max() > 0
    # lambda * L_vlb with L_vlb = T * E_t[L_t]: the per-example term is scaled by T * lambda
    x_t = d.q_sample(x0, torch.tensor([3, 700]), noise)
    vb, _ = d.vb_terms_bpd(out.detach(), x0, x_t, torch.tensor([3, 700]), clip_denoised=False)
    torch.testing.assert_close(losses["vb"].detach(), vb * 1000 * 0.001)
