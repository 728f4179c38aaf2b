import math

import numpy as np
import pytest
import torch
from conftest import gaussian_optimal_eps, linear

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.samplers import SAMPLERS, ddim_sample_loop, p_sample, timestep_subset
from ddpm.schedules import make_betas


def sample_toy(var_type, steps, mu=0.3, sigma=0.2):
    d = linear(var_type=var_type)
    chain = d if steps is None else d.respaced(steps)
    model = gaussian_optimal_eps(d, mu, sigma)
    return chain.p_sample_loop(
        model, (20_000, 1), generator=torch.Generator().manual_seed(6), clip_denoised=False
    )


def test_spacings():
    for steps in (61, 103, 121, 1000):  # float arange used to add a -1 for some counts
        kept = timestep_subset(1000, steps, "trailing")
        assert len(kept) == steps and kept[0] >= 0 and kept[-1] == 999
    assert timestep_subset(1000, 10, "leading") == list(range(0, 1000, 100))
    assert timestep_subset(1000, 10, "trailing") == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    lin = timestep_subset(1000, 10, "linspace")
    assert lin[0] == 0 and lin[-1] == 999 and len(lin) == 10
    with pytest.raises(ConfigError):
        timestep_subset(1000, 10, "cosine")
    with pytest.raises(ConfigError):
        timestep_subset(1000, 0)


def test_ddim_with_eta_one_on_all_steps_is_ancestral_fixed_small():
    d = GaussianDiffusion(make_betas("linear", 50), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.2, 0.3)
    ancestral = d.p_sample_loop(model, (64, 1), generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample_loop(d, model, (64, 1), eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim, ancestral, rtol=1e-4, atol=1e-5)


def test_ddim_step_matches_diffusers():
    """One DDIM step on 'leading' spacing (where diffusers' prev_t is the next kept step) equals
    DDIMScheduler.step with eta = 0 and eta = 0.5 given the same eps and noise."""
    from diffusers import DDIMScheduler

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    chain = d.respaced(timestep_subset(1000, 10, "leading"))
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True)
    sched.set_timesteps(10)
    assert sorted(sched.timesteps.tolist()) == chain.timestep_map.tolist()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for eta in (0.0, 0.5):
        for index, t in ((9, 900), (4, 400)):
            ours = ddim_sample_loop_one_step(chain, eps, x, index, eta)
            theirs = sched.step(
                eps, t, x, eta=eta, use_clipped_model_output=True, generator=torch.Generator().manual_seed(5)
            ).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def ddim_sample_loop_one_step(chain, eps, x, index, eta):
    """Our DDIM update for the single step from respaced index ``index`` (noise seeded as diffusers')."""
    sub = GaussianDiffusion(
        chain.betas[: index + 1], var_type="fixedsmall", timestep_map=chain.timestep_map[: index + 1]
    )
    g = torch.Generator().manual_seed(5)
    calls = []

    def model(x_, t_):
        calls.append(int(t_[0]))
        if len(calls) > 1:  # stop after one step: hand the result back through an exception
            raise StopIteration(x_)
        return eps

    try:
        ddim_sample_loop(sub, model, tuple(x.shape), eta=eta, generator=g, x_start=x)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("expected more than one step")


def test_deterministic_ddim_recovers_the_toy_gaussian():
    """eta = 0 integrates the probability-flow ODE: exact in the limit of many steps, and on few steps it
    under-disperses (0.177 at 50 steps, 0.1945 at 200, 0.1994 at 1000 for a true 0.2)."""
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    spreads = []
    for steps in (50, 1000):
        chain = d.respaced(timestep_subset(1000, steps))
        g = torch.Generator().manual_seed(0)
        x = ddim_sample_loop(chain, model, (20_000, 1), eta=0.0, generator=g, clip_denoised=False)
        assert x.mean().item() == pytest.approx(0.3, abs=0.01)
        spreads.append(x.std().item())
    assert 0.16 < spreads[0] < spreads[1]
    assert spreads[1] == pytest.approx(0.2, rel=0.02)


@pytest.mark.parametrize(
    "sampler, steps, eta, tol",
    [
        ("ancestral", 1000, 0.0, 0.03),
        ("ancestral", 100, 0.0, 0.15),  # fixed-small on 100 steps under-disperses (see test_diffusion)
        ("ddim", 100, 0.0, 0.07),  # 0.1886: the ODE on 100 linspace steps also under-disperses
        ("ddim", 100, 1.0, 0.15),
        ("dpm++2m", 10, 0.0, 0.03),
        ("dpm++2m", 25, 0.0, 0.02),
        ("sde-dpm++2m", 20, None, 0.05),  # None: the SDE's own eta, 1
        ("sde-dpm++2m", 50, None, 0.03),
        ("sde-dpm++3m", 50, None, 0.05),  # 21% under at 20 linspace steps, as the others on linspace
    ],
)
def test_every_sampler_recovers_the_toy_gaussian(sampler, steps, eta, tol):
    """With the exact E[eps | x_t] for data N(0.3, 0.2^2), each sampler's output has that mean and
    spread. The second-order solver (on log-SNR spacing) is within 3% at 10 steps; DDIM is 6% off at 100."""
    from ddpm.sample import generate

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x = generate(
        model, d, 20_000, (1,), 20_000, seed=0, steps=steps, clip_denoised=False, sampler=sampler, eta=eta
    )
    assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert x.std().item() == pytest.approx(0.2, rel=tol)


def test_dpm_solver_matches_diffusers_multistep_scheduler():
    """The whole DPM-Solver++(2M) loop equals diffusers' DPMSolverMultistepScheduler (dpmsolver++, order
    2, final sigma zero) given the same network, on its linspace and trailing timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    from ddpm.samplers import dpm_solver_pp_2m_sample_loop, solver_timesteps

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for spacing, steps in (("linspace", 10), ("linspace", 25), ("trailing", 12)):
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing
        )
        sched.set_timesteps(steps)
        assert sorted(sched.timesteps.tolist()) == solver_timesteps(1000, steps, spacing)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t.repeat(len(x))), t, x).prev_sample
        chain = d.respaced(solver_timesteps(1000, steps, spacing))
        ours = dpm_solver_pp_2m_sample_loop(chain, model, tuple(x_T.shape), clip_denoised=False, x_start=x_T)
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_sde_dpm_solver_matches_diffusers_given_the_same_noise():
    """The whole SDE-DPM-Solver++(2M) loop equals diffusers' DPMSolverMultistepScheduler
    (sde-dpmsolver++, order 2, midpoint) when both draw each step's noise from the same generator."""
    from diffusers import DPMSolverMultistepScheduler

    from ddpm.samplers import sde_dpm_solver_pp_2m_sample_loop, solver_timesteps

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for spacing, steps in (("linspace", 10), ("trailing", 20)):
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
            timestep_spacing=spacing,
        )
        sched.set_timesteps(steps)
        x, g = x_T.clone(), torch.Generator().manual_seed(1)
        for t in sched.timesteps:
            x = sched.step(model(x, t.repeat(len(x))), t, x, generator=g).prev_sample
        chain = d.respaced(solver_timesteps(1000, steps, spacing))
        ours = sde_dpm_solver_pp_2m_sample_loop(
            chain,
            model,
            tuple(x_T.shape),
            clip_denoised=False,
            x_start=x_T,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
        ode = SAMPLERS["dpm++2m"].loop(chain, model, tuple(x_T.shape), clip_denoised=False, x_start=x_T)
        assert not torch.allclose(ours, ode, atol=1e-3)  # the noise matters


def k_diffusion_dpmpp_3m_sde(chain, model, x_T, generator, eta=1.0):
    """k-diffusion's sample_dpmpp_3m_sde, written as it is there: in the variance-exploding
    variables x / alpha and sigma / alpha, with the network called on the variance-preserving x."""
    ab = np.asarray(chain.alphas_cumprod, dtype=np.float64)
    steps = list(range(chain.num_timesteps - 1, -1, -1))
    sigmas = [math.sqrt((1 - ab[i]) / ab[i]) for i in steps] + [0.0]
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for k, i in enumerate(steps):
        x_vp = x / math.sqrt(1 + sigmas[k] ** 2)
        t = torch.full((len(x),), i, dtype=torch.long)
        denoised = chain.predict(model, x_vp, t, clip_denoised=False).pred_x0
        if sigmas[k + 1] == 0:
            return denoised
        h = -math.log(sigmas[k + 1]) + math.log(sigmas[k])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            r = h_1 / h
            d = (denoised - denoised_1) / r
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            x = x + phi_2 * d
        x = x + torch.randn(x.shape, generator=generator) * sigmas[k + 1] * math.sqrt(
            -math.expm1(-2 * h * eta)
        )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1


def test_the_sde_solvers_noise_level_spans_the_ode_to_more_noise_than_the_sde():
    """eta = 0 is the ODE solver's update (no noise drawn); eta = 1 the SDE; eta = 2 and 3 differ from
    both but still sample the toy Gaussian, with either solver, on 50 log-SNR steps. (On linspace steps
    the third-order solver with eta = 3 over-disperses it: by 25% at 20-100 steps, 6% at 250.)"""
    from ddpm.samplers import dpm_solver_pp_2m_sample_loop, solver_timesteps

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    chain = d.respaced(solver_timesteps(1000, 50, "logsnr", d.alphas_cumprod))
    x_T = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))

    def sde(eta, name="sde-dpm++2m"):
        g = torch.Generator().manual_seed(1)
        return SAMPLERS[name].loop(
            chain, model, (20_000, 1), clip_denoised=False, x_start=x_T, generator=g, eta=eta
        )

    ode = dpm_solver_pp_2m_sample_loop(chain, model, (20_000, 1), clip_denoised=False, x_start=x_T)
    torch.testing.assert_close(sde(0.0), ode, rtol=1e-5, atol=1e-6)
    for name in ("sde-dpm++2m", "sde-dpm++3m"):
        for eta in (1.0, 2.0, 3.0):
            x = sde(eta, name)
            assert not torch.allclose(x, ode, atol=1e-3)
            assert x.mean().item() == pytest.approx(0.3, abs=0.01)
            assert x.std().item() == pytest.approx(0.2, rel=0.05), (name, eta)
    assert not torch.allclose(sde(2.0), sde(1.0), atol=1e-3)
    with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
        sde(-1.0)


def test_sde_dpm_solver_3m_is_k_diffusions_given_the_same_noise():
    from ddpm.samplers import sde_dpm_solver_pp_3m_sample_loop, solver_timesteps

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for spacing, steps in (("linspace", 10), ("karras", 20)):
        chain = d.respaced(solver_timesteps(1000, steps, spacing, d.alphas_cumprod))
        theirs = k_diffusion_dpmpp_3m_sde(chain, model, x_T, torch.Generator().manual_seed(1))
        ours = sde_dpm_solver_pp_3m_sample_loop(
            chain,
            model,
            (8, 1, 2, 2),
            clip_denoised=False,
            x_start=x_T,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_karras_spacing_is_even_in_sigma_to_the_one_seventh():
    d = GaussianDiffusion(make_betas("linear", 1000))
    sigma = np.sqrt((1 - d.alphas_cumprod) / d.alphas_cumprod)
    kept = timestep_subset(1000, 20, "karras", d.alphas_cumprod)
    assert len(kept) == 20 and kept[0] == 0 and kept[-1] == 999
    gaps = np.diff(sigma[kept] ** (1 / 7))
    assert gaps.max() / gaps.min() < 1.3  # even up to the rounding to whole timesteps
    logsnr, linspace = (timestep_subset(1000, 20, s, d.alphas_cumprod) for s in ("logsnr", "linspace"))
    assert logsnr[5] < kept[5] < linspace[5]  # between the two near t = 0


def test_logsnr_spacing_is_even_in_log_snr_and_distinct():
    d = GaussianDiffusion(make_betas("linear", 1000))
    log_snr = np.log(d.alphas_cumprod / (1 - d.alphas_cumprod))
    for steps in (10, 25, 200, 1000):
        kept = timestep_subset(1000, steps, "logsnr", d.alphas_cumprod)
        assert len(kept) == steps and kept[0] == 0 and kept[-1] == 999
    kept = timestep_subset(1000, 10, "logsnr", d.alphas_cumprod)
    gaps = -np.diff(log_snr[kept])
    assert gaps.max() / gaps.min() < 1.6  # even up to the rounding to whole timesteps
    with pytest.raises(ConfigError, match="schedule"):
        timestep_subset(1000, 10, "logsnr")


@pytest.mark.parametrize("var_type,their_var", [("fixedsmall", "fixed_small"), ("fixedlarge", "fixed_large")])
@pytest.mark.parametrize("t_value", [999, 500, 10, 1, 0])
def test_reverse_step_matches_diffusers(var_type, their_var, t_value):
    """One step of Algorithm 2 equals diffusers' DDPMScheduler.step given the same eps and noise."""
    from diffusers import DDPMScheduler

    d = linear(var_type=var_type)
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=their_var, clip_sample=True)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    ours = p_sample(
        d, lambda x, t: eps, x_t, torch.full((4,), t_value), generator=torch.Generator().manual_seed(3)
    ).sample
    theirs = sched.step(eps, t_value, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_sampling_recovers_toy_gaussian(var_type):
    x = sample_toy(var_type, None)
    assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert x.std().item() == pytest.approx(0.2, rel=0.03)


def test_respaced_sampling_brackets_the_true_spread():
    """On 100 strided steps the mean stays exact; beta-tilde undershoots and beta overshoots the
    spread (the reverse variance lies between them), converging as steps grow."""
    small, large = sample_toy("fixedsmall", 100), sample_toy("fixedlarge", 100)
    for x in (small, large):
        assert x.mean().item() == pytest.approx(0.3, abs=0.01)
    assert 0.15 < small.std().item() < 0.2 < large.std().item() < 0.25


def test_progressive_sampling_exposes_every_step():
    d = linear(T=20)
    steps = list(
        d.p_sample_loop_progressive(
            lambda x, t: torch.zeros_like(x), (2, 1, 4, 4), generator=torch.Generator().manual_seed(0)
        )
    )
    assert [s.t for s in steps] == list(range(19, -1, -1))
    # The last step adds no noise: the sample is the (clipped) x0 prediction's posterior mean at t=0.
    assert torch.equal(steps[-1].sample, steps[-1].pred_x0)


def test_shared_noise_gives_every_example_the_same_chain():
    d = linear(T=10)
    x = torch.randn(1, 1, 2, 2).expand(3, 1, 2, 2)
    out = d.p_sample_loop(
        lambda x_, t: torch.zeros_like(x_),
        (3, 1, 2, 2),
        x_start=x,
        shared_noise=True,
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    independent = d.p_sample_loop(
        lambda x_, t: torch.zeros_like(x_),
        (3, 1, 2, 2),
        x_start=x,
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    assert not torch.equal(independent[0], independent[1])


def test_ddim_inversion_round_trips():
    """image -> latent (DDIM inversion) -> image (DDIM, eta = 0): the error shrinks with the number of
    steps; at 100 log-SNR-spaced steps the RMS error is below 0.01 (data std 0.2; 0.0096 measured), and
    the latent of N(0.3, 0.2^2) data is close to N(0, 1)."""
    from ddpm.samplers import ddim_invert

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x0 = 0.3 + 0.2 * torch.randn(5000, 1, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (20, 100):
        chain = d.respaced(timestep_subset(1000, steps, "logsnr", d.alphas_cumprod))
        latent = ddim_invert(chain, model, x0, clip_denoised=False)
        back = ddim_sample_loop(chain, model, tuple(x0.shape), eta=0.0, clip_denoised=False, x_start=latent)
        errors.append((back - x0).pow(2).mean().sqrt().item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.01
    # trailing spacing never has t = 0: the first inverting step must start from clean data
    chain = d.respaced(timestep_subset(1000, 100, "trailing"))
    latent = ddim_invert(chain, model, x0, clip_denoised=False)
    back = ddim_sample_loop(chain, model, tuple(x0.shape), eta=0.0, clip_denoised=False, x_start=latent)
    assert (back - x0).pow(2).mean().sqrt().item() < 0.02  # 0.026 when the data was taken to be at t = 9
    assert latent.mean().item() == pytest.approx(0.0, abs=0.05)
    assert latent.std().item() == pytest.approx(1, rel=0.05)


def test_the_registry_gives_every_sampler_one_signature_and_its_spacing():
    import inspect

    from ddpm.samplers import (
        ETA_DEFAULTS,
        SAMPLERS,
        get_sampler,
        sampling_chain,
        solver_timesteps,
    )

    assert set(SAMPLERS) == {"ancestral", "ddim", "dpm++2m", "sde-dpm++2m", "sde-dpm++3m", "edm"}
    assert {name: sampler.default_spacing for name, sampler in SAMPLERS.items()} == {
        "ancestral": "linspace",
        "ddim": "linspace",
        "dpm++2m": "logsnr",
        "sde-dpm++2m": "logsnr",
        "sde-dpm++3m": "linspace",
        "edm": "karras",
    }
    expected = ["generator", "device", "clip_denoised", "x_start", "eta", "progress", "callback"]
    d = linear(T=100)
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x_T = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    for name, sampler in SAMPLERS.items():
        params = inspect.signature(sampler.loop).parameters
        assert list(params)[:3] == ["chain", "model", "shape"]
        assert [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY][:7] == expected
        chain = sampling_chain(d, name, 10)
        assert chain.num_timesteps == 10
        kept = sampler.timesteps(100, 10, sampler.default_spacing, d.alphas_cumprod)
        assert list(chain.timestep_map) == kept
        x = sampler.loop(chain, model, (4, 1), x_start=x_T, clip_denoised=False)
        assert x.shape == (4, 1) and torch.isfinite(x).all()
        if name not in ETA_DEFAULTS:
            with pytest.raises(ConfigError, match="eta is the noise level of ddim, sde-dpm"):
                sampler.loop(chain, model, (4, 1), x_start=x_T, eta=0.5)
    assert SAMPLERS["dpm++2m"].timesteps is solver_timesteps
    assert sampling_chain(d, "ddim", None) is d and sampling_chain(d, "ddim", 100) is d
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; choose one of ancestral, ddim, dpm"):
        get_sampler("euler")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_calls_back_after_every_step_and_samples_the_same(name):
    """The callback sees each step in order (its number, the chain timestep it started from, the new x,
    the x0 prediction), the last x is the sample, and watching changes nothing."""
    d = linear(T=100)
    chain = d.respaced(8)
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    x_T = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
    seen = []

    def watch(step, t, x, pred_x0):
        seen.append((step, t, x.clone(), pred_x0.clone()))

    def draw(**kwargs):
        g = torch.Generator().manual_seed(1)
        return SAMPLERS[name].loop(chain, model, (6, 1), x_start=x_T, generator=g, **kwargs)

    plain, watched = draw(), draw(callback=watch)
    assert torch.equal(plain, watched)
    assert [(step, t) for step, t, _, _ in seen] == [(n, 7 - n) for n in range(8)]
    assert torch.equal(seen[-1][2], watched)
    assert all(x.shape == pred_x0.shape == (6, 1) for _, _, x, pred_x0 in seen)


def test_the_ancestral_callback_sees_the_progressive_steps():
    d = linear(T=20)
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    steps = list(d.p_sample_loop_progressive(model, (3, 1), generator=torch.Generator().manual_seed(0)))
    seen = []
    d.p_sample_loop(
        model,
        (3, 1),
        generator=torch.Generator().manual_seed(0),
        callback=lambda step, t, x, pred_x0: seen.append((step, t, x, pred_x0)),
    )
    assert [(n, s.t) for n, s in enumerate(steps)] == [(n, t) for n, t, _, _ in seen]
    for s, (_, _, x, pred_x0) in zip(steps, seen, strict=True):
        assert torch.equal(s.sample, x) and torch.equal(s.pred_x0, pred_x0)


def test_the_cli_offers_what_the_registry_has():
    from ddpm.cli import build_parser
    from ddpm.samplers import SAMPLERS, SPACINGS

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    actions = {a.dest: a for a in sample._actions}
    assert tuple(actions["sampler"].choices) == tuple(SAMPLERS)
    assert tuple(actions["spacing"].choices) == SPACINGS


def test_predict_is_the_network_on_the_original_timesteps():
    d = linear(T=100).respaced(5)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    x = torch.ones(2, 1)
    t = torch.tensor([4, 1])
    out = d.predict(model, x, t, clip_denoised=False)
    assert seen == [[int(d.timestep_map[4]), int(d.timestep_map[1])]]
    torch.testing.assert_close(out.pred_x0, d.coef("sqrt_recip_alphas_cumprod", t, 2) * x)
