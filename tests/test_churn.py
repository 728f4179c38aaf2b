"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) as the "edm" sampler: Heun steps in EDM's
variables with churn, the churned noise level rounded to one of the full diffusion's timesteps."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import gaussian_optimal_eps, linear

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.samplers import (
    ETA_DEFAULTS,
    ETA_LIMITS,
    SAMPLERS,
    check_eta,
    edm_churn_sample_loop,
    sampling_chain,
    timestep_subset,
)
from ddpm.schedules import make_betas

MU, SD = 0.3, 0.2  # the toy data distribution N(MU, SD^2), whose exact eps (hence D) is known


def toy():
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    return d, gaussian_optimal_eps(d, MU, SD)


def counting(model, calls):
    def counted(x, t):
        calls.append((t.clone(), x.clone()))
        return model(x, t)

    return counted


@pytest.mark.parametrize("eta", [0.0, 40.0])
def test_edm_samples_the_toy_gaussian(eta):
    """On 200 karras steps the output has the data's mean and spread, deterministic (eta = 0) and churned
    (eta = 40: gamma = 0.2 per step). With n = 20,000 samples the standard errors are 0.2 / sqrt(n) =
    0.0014 for the mean and 0.2 / sqrt(2n) = 0.001 (0.5%) for the std; the tolerances are 4 of them.
    The discretisation bias is below that: measured on 100,000 samples, the std is 0.2000 (eta 0) and
    0.2005 (eta 40) at 200 steps. Fewer steps over-disperse (Heun's method on this schedule), beyond
    these tolerances: 0.2079 with eta = 40 on 50 steps, 0.266 deterministic on 10."""
    d, model = toy()
    chain = sampling_chain(d, "edm", 200)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    x = SAMPLERS["edm"].loop(chain, model, (n, 1), generator=g, clip_denoised=False, eta=eta)
    se_mean, se_std = SD / math.sqrt(n), SD / math.sqrt(2 * n)
    assert x.mean().item() == pytest.approx(MU, abs=4 * se_mean)
    assert x.std().item() == pytest.approx(SD, abs=4 * se_std), x.std().item()


def hand_heun(levels, x_T):
    """EDM's Algorithm 1 written out in float64 on the noise levels ``levels`` (decreasing, then 0), with
    the toy data's exact denoiser D(x, sigma) = mu + sd^2 / (sd^2 + sigma^2) (x - mu)."""

    def D(x, sigma):
        return MU + SD**2 / (SD**2 + sigma**2) * (x - MU)

    x = x_T.double() * math.sqrt(1 + levels[0] ** 2)  # x_T in EDM's scale: x_vp / sqrt(alphabar)
    for a, b in itertools.pairwise(levels):
        d = (x - D(x, a)) / a
        x_next = x + (b - a) * d
        if b > 0:
            x_next = x + (b - a) * (d + (x_next - D(x_next, b)) / b) / 2
        x = x_next
    return x


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_eta_zero_is_heuns_method_on_the_probability_flow_ode(steps):
    """eta = 0 is Algorithm 1 on the chain's levels, to float32 precision: x in EDM's scale reaches
    sigma_max = 157, and the eps model's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) cancels to 4e-5 at
    1 step (measured; 4e-6 at 5, 1e-6 at 10). (At 2-3 steps Heun's first step spans 157 -> 0.35 or
    less, the samples come out 10-270 and float32's error 4e-4-2e-3: no comparison there.)"""
    d, model = toy()
    chain = sampling_chain(d, "edm", steps)
    ab = d.alphas_cumprod[chain.timestep_map]  # the original chain's, in float64
    levels = [*np.sqrt((1 - ab) / ab)[::-1], 0.0]
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    expected = hand_heun(levels, x_T)
    runs = [
        edm_churn_sample_loop(
            chain,
            model,
            (64, 1),
            x_start=x_T,
            clip_denoised=False,
            eta=0.0,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (1, 2)
    ]
    assert torch.equal(runs[0], runs[1])  # no noise drawn
    torch.testing.assert_close(runs[0].double(), expected, rtol=1e-4, atol=1e-4)
    if steps > 1:  # and the churn changes it
        churned = edm_churn_sample_loop(
            chain,
            model,
            (64, 1),
            x_start=x_T,
            clip_denoised=False,
            eta=10.0,
            generator=torch.Generator().manual_seed(1),
        )
        assert not torch.allclose(churned, runs[0], atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("eta", [0.0, 10.0, 1000.0])
def test_n_steps_evaluate_the_network_2n_minus_1_times(steps, eta):
    d, model = toy()
    chain = sampling_chain(d, "edm", steps)
    calls = []
    x = edm_churn_sample_loop(
        chain, counting(model, calls), (4, 1), generator=torch.Generator().manual_seed(0), eta=eta
    )
    assert len(calls) == 2 * steps - 1
    assert torch.isfinite(x).all()


def test_the_churned_level_is_a_timestep_of_the_full_chain_and_the_noise_reaches_it():
    """Every network call gets one integer timestep of 0..T-1 for the whole batch; with churn, the step
    from chain timestep t first calls the network at a timestep t' >= t of the full chain, mostly not one
    of the chain's 100, and the x it passes has exactly that timestep's marginal: for data N(mu, sd^2),
    x_t ~ N(sqrt(abar) mu, abar sd^2 + 1 - abar). With 10,000 samples the standard errors are 1% of the
    std for the mean and 0.7% for the std; the tolerances are 5% of the std for both, which also covers
    the discretisation (the largest miss measured is 2.0%, with the Heun corrections evaluated at Euler
    predictions). At gamma = 0.2 adding the noise of the unrounded level misses by up to 20%, adding
    (sigma_hat - sigma) instead of sqrt(sigma_hat^2 - sigma^2) by 70%."""
    d, model = toy()
    T, N = d.num_timesteps, 100
    chain = sampling_chain(d, "edm", N)
    kept = set(chain.timestep_map.tolist())
    calls = []
    edm_churn_sample_loop(
        chain,
        counting(model, calls),
        (10_000, 1),
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
        eta=20.0,  # gamma = 20 / 100 = 0.2
    )
    assert len(calls) == 2 * N - 1
    for k, (t, x) in enumerate(calls):
        assert t.dtype == torch.long and t.shape == (10_000,) and bool((t == t[0]).all())
        step_t = int(t[0])
        assert 0 <= step_t < T
        ab = d.alphas_cumprod[step_t]
        std = math.sqrt(ab * SD**2 + 1 - ab)
        assert x.mean().item() == pytest.approx(math.sqrt(ab) * MU, abs=5 * std / 100), (k, step_t)
        assert x.std().item() == pytest.approx(std, rel=0.05), (k, step_t, x.std().item() / std)
    firsts = [int(calls[2 * k][0][0]) for k in range(N)]  # each step's first call: at its churned level
    churned = [t - int(chain_t) for t, chain_t in zip(firsts, chain.timestep_map[::-1], strict=True)]
    assert min(churned) == 0
    # All but two steps go up: not the top one (nothing above T - 1), nor t = 0, whose next level is
    # 1.48 times its sigma, further than the 1.4 that 1 + gamma = 1.2 rounds up to.
    assert firsts[0] == T - 1 and firsts[-1] == 0 and sum(c > 0 for c in churned) == N - 2
    # mostly to timesteps off the chain (80 measured; near t = 0 karras keeps consecutive timesteps)
    assert sum(t not in kept for t in firsts) >= 70


def test_any_respaced_chain_knows_its_full_diffusion():
    """``diffusion.respaced`` records the diffusion it was cut from (respacing a respaced chain keeps the
    first), so the churn of any chain rounds to all T levels, off the chain's own timesteps."""
    d, model = toy()
    chain = d.respaced(timestep_subset(1000, 8, "karras", d.alphas_cumprod))
    assert chain.full_chain is d and chain.respaced([0, 1]).full_chain is d and d.full_chain is d
    calls = []
    edm_churn_sample_loop(chain, counting(model, calls), (4, 1), generator=torch.Generator().manual_seed(0))
    assert {int(t[0]) for t, _ in calls} - set(chain.timestep_map.tolist())


def test_the_registry_has_edm_with_its_noise_level():
    sampler = SAMPLERS["edm"]
    assert sampler.loop is edm_churn_sample_loop
    assert sampler.default_spacing == "karras"
    assert sampler.timesteps is timestep_subset
    assert "Karras et al. 2022" in sampler.summary and "2N - 1" in sampler.summary
    assert check_eta("edm", None) == ETA_DEFAULTS["edm"] == 10.0
    assert check_eta("edm", 0.0) == 0.0 and check_eta("edm", ETA_LIMITS["edm"]) == ETA_LIMITS["edm"]
    for bad in (-1.0, math.nan, math.inf, ETA_LIMITS["edm"] * 1.01, 1e308):
        with pytest.raises(ConfigError) as info:
            check_eta("edm", bad)
        assert "\n" not in str(info.value)
    with pytest.raises(
        ConfigError, match=r"the edm sampler's eta must be at most 1000 \(eta is EDM's S_churn"
    ):
        check_eta("edm", 5000.0)
    d, model = toy()
    with pytest.raises(ConfigError, match="S_churn"):
        edm_churn_sample_loop(sampling_chain(d, "edm", 5), model, (2, 1), eta=5000.0)


@pytest.mark.parametrize("steps", [None, 10, 100])
def test_edm_runs_on_sampling_chain(steps):
    d = linear(T=100, var_type="fixedsmall")
    model = gaussian_optimal_eps(d, MU, SD)
    chain = sampling_chain(d, "edm", steps)
    if steps in (None, 100):
        assert chain is d
    else:
        assert chain.full_chain is d
        assert list(chain.timestep_map) == timestep_subset(100, steps, "karras", d.alphas_cumprod)
    seen = []
    x = SAMPLERS["edm"].loop(
        chain,
        model,
        (8, 1, 2, 2),
        generator=torch.Generator().manual_seed(0),
        callback=lambda n, t, x_, x0: seen.append((n, t)),
    )
    assert x.shape == (8, 1, 2, 2) and torch.isfinite(x).all() and x.abs().max() <= 1  # clipped x0
    assert seen == [(n, chain.num_timesteps - 1 - n) for n in range(chain.num_timesteps)]
    if steps == 10:  # without churn the record of the full diffusion makes no difference
        x_T = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
        plain = d.respaced(chain.timestep_map.tolist())
        a, b = (edm_churn_sample_loop(c, model, (8, 1), x_start=x_T, eta=0.0) for c in (chain, plain))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generate_draws_with_edm():
    from ddpm.sample import generate

    d, model = toy()
    x = generate(model, d, 10_000, (1,), 10_000, seed=0, steps=50, clip_denoised=False, sampler="edm")
    # the default churn (eta = 10, gamma = 0.2) on 50 steps over-disperses by 2.8% (0.2056 measured on
    # 100,000 samples); the standard errors here are 0.002 for the mean and 0.7% for the std
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(SD * 1.028, rel=0.035), x.std().item()
