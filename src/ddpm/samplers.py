"""Samplers: the paper's ancestral sampler (Algorithm 2), DDIM (Song et al. 2021) with its inversion,
DPM-Solver++(2M) (Lu et al. 2022) and its stochastic SDE variants (2M, and 3M as in k-diffusion) with a
noise level, and EDM's stochastic Heun sampler (Karras et al. 2022), each under its own name in ``SAMPLERS``.

Every sampler walks a chain: the diffusion itself (all T steps) or a subset of its timesteps chosen by
a named spacing (:func:`sampling_chain`), which is a respaced diffusion whose every step goes to the
next kept timestep. Every loop has one signature:

    loop(chain, model, shape, *, generator=None, device="cpu", clip_denoised=True, x_start=None, eta=0.0,
         progress=False, callback=None)

and returns the final sample; ``model`` is any callable ``(x_t, t) -> output``. ``callback`` (a
:data:`ddpm.diffusion.StepCallback`) is called after every step with (the step's number, the chain
timestep it started from, the new x, the x0 prediction it used), as k-diffusion's samplers do: the
figures draw their chains with it. Algorithm 2 itself (``p_sample``, ``ancestral_progressive``) is in
:mod:`ddpm.diffusion`; the names are kept here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import (
    GaussianDiffusion,
    Model,
    StepCallback,
    initial_sample,
    reverse_indices,
    space_timesteps,
    timestep_batch,
)
from .diffusion import SampleStep as SampleStep  # Algorithm 2's pieces, importable from here as before
from .diffusion import ancestral_progressive as ancestral_progressive
from .diffusion import p_sample as p_sample
from .errors import ConfigError
from .rng import randn_like

SPACINGS = ("linspace", "leading", "trailing", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022's rho: larger puts more steps near t = 0


# ---- which timesteps a chain of N steps keeps ----


def timestep_subset(
    num_timesteps: int, steps: int, spacing: str = "linspace", alphas_cumprod=None
) -> list[int]:
    """``steps`` of the timesteps 0..T-1: "linspace" spreads them from 0 to T-1 (Improved DDPM),
    "leading" takes 0, T/n, 2T/n, ... (DDIM's paper), "trailing" ends exactly at T-1 (Lin et al. 2024),
    "logsnr" spaces them evenly in log(alphabar / (1 - alphabar)) from T-1 to 0 (DPM-Solver's choice;
    needs ``alphas_cumprod``), which puts many more steps near t = 0 than the others; "karras" spaces
    the noise level sigma = sqrt((1 - alphabar) / alphabar) evenly in sigma^(1/7) (Karras et al. 2022),
    between the two: fewer steps near t = 0 than logsnr, more than linspace."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"number of sampling steps must be in 1..{T}, got {steps}")
    if spacing == "linspace":
        return space_timesteps(T, steps)
    if spacing == "leading":
        kept = np.arange(steps) * (T // steps)
    elif spacing == "trailing":
        kept = np.round(T - np.arange(steps) * (T / steps)) - 1  # (arange with a float step can overshoot)
    elif spacing in ("logsnr", "karras"):
        if alphas_cumprod is None:
            raise ConfigError(f"{spacing} spacing needs the noise schedule (alphas_cumprod)")
        ab = np.asarray(alphas_cumprod, dtype=np.float64)
        log_snr = np.log(ab) - np.log1p(-ab)  # decreasing in t
        if spacing == "logsnr":
            targets = np.linspace(log_snr[0], log_snr[-1], steps)
        else:  # even in sigma^(1/rho), as log-SNR targets (sigma = exp(-log_snr / 2))
            ends = np.exp(-log_snr[[0, -1]] / (2 * KARRAS_RHO))
            targets = -2 * KARRAS_RHO * np.log(np.linspace(ends[0], ends[1], steps))
        kept = np.searchsorted(-log_snr, -targets).clip(0, T - 1)
        for i in range(1, steps):  # near t = 0 one step spans a lot of log-SNR: keep the steps distinct
            kept[i] = max(kept[i], kept[i - 1] + 1)
        kept[-1] = T - 1
        for i in range(steps - 2, -1, -1):
            kept[i] = min(kept[i], kept[i + 1] - 1)
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted({int(t) for t in kept})


def solver_timesteps(
    num_timesteps: int, steps: int, spacing: str = "logsnr", alphas_cumprod=None
) -> list[int]:
    """The ``steps`` timesteps DPM-Solver evaluates the network at; its last step then goes on to clean
    data (sigma = 0). "logsnr" keeps t = 0, so that last jump is tiny. For the other spacings these are
    diffusers' DPMSolverMultistepScheduler timesteps, which spend no evaluation at t = 0: linspace and
    leading take steps + 1 points and drop 0, trailing never has it."""
    if steps == num_timesteps or spacing in ("logsnr", "karras"):
        return timestep_subset(num_timesteps, steps, spacing, alphas_cumprod)
    if spacing == "trailing":
        return timestep_subset(num_timesteps, steps, spacing)
    return timestep_subset(num_timesteps, steps + 1, spacing)[1:]


# ---- the loops ----


# The samplers with a noise level eta, and their default: DDIM's (0 deterministic, 1 = Algorithm 2 with the
# fixed-small variance) and the SDE solvers' (0 = the probability-flow ODE, 1 = the reverse SDE, more =
# extra noise: each step forgets more of x_s and re-noises more of its x0 prediction).
# EDM's eta is its S_churn (see edm_churn_sample_loop): each step's churn is gamma = min(eta / N, sqrt(2) - 1)
# on N steps, so eta is the churn summed over the steps. 10 is EDM's ImageNet-64 setting (S_churn = 40 on 256
# steps, gamma = 0.156) scaled to 64 steps: gamma = 0.1-0.2 at the 50-100 steps a stochastic sampler wants
# here, 0.4 at 25 (the cap, sqrt(2) - 1 = 0.414, at 24 or fewer).
ETA_DEFAULTS = {"ddim": 0.0, "sde-dpm++2m": 1.0, "sde-dpm++3m": 1.0, "edm": 10.0}
# The largest eta each takes. DDIM's is 1: its step noise sigma = eta * (the posterior's std) must leave
# 1 - alphabar_prev - sigma^2 >= 0 for the direction term's square root, which eta = 1 just keeps on the
# longest (respaced) steps; above it the square root is NaN and the images come out black. The SDE
# solvers take any eta mathematically (each step keeps exp(-h eta) of x_s), but by 10 they re-noise
# their x0 prediction almost completely every step at the usual 10-100 steps; 2-3 already over-disperse
# (tests/test_samplers.py), and values like 1e308 only overflow the step's arithmetic.
# EDM's S_churn takes any value too, as gamma is capped at sqrt(2) - 1 (the churn that at most doubles the
# noise variance): above (sqrt(2) - 1) N every one of the N steps is at the cap, so 1000 already puts every
# chain of up to 2414 steps (more than the paper's T = 1000) there, and more only hides a typo. EDM's own
# settings are 30-80.
ETA_LIMITS = {"ddim": 1.0, "sde-dpm++2m": 10.0, "sde-dpm++3m": 10.0, "edm": 1000.0}


def check_eta(sampler: str, eta: float | None) -> float:
    """``eta`` for ``sampler`` (None: its default): a finite number in [0, ETA_LIMITS[sampler]], and only
    for the samplers that have one."""
    if eta is None:
        return ETA_DEFAULTS.get(sampler, 0.0)
    if sampler not in ETA_DEFAULTS and eta != 0:
        raise ConfigError(
            f"eta is the noise level of {', '.join(ETA_DEFAULTS)}; the {sampler} sampler has none "
            f"(got eta={eta})"
        )
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"eta must be a finite number >= 0, got {eta}")
    limit = ETA_LIMITS.get(sampler)
    if limit is not None and eta > limit:
        why = {
            "ddim": "1 is the ancestral sampler's noise; more leaves no variance for the step",
            "edm": "eta is EDM's S_churn, each of N steps churning min(eta / N, sqrt(2) - 1): "
            "above 1000 every chain of up to 2414 steps is already at that cap",
        }.get(sampler, "1 is the reverse SDE; more re-noises each step further")
        raise ConfigError(f"the {sampler} sampler's eta must be at most {limit:g} ({why}), got {eta}")
    return eta


@torch.inference_mode()
def ancestral_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
    **options,
) -> torch.Tensor:
    """The final sample of Algorithm 2 (``chain.p_sample_loop``; in [-1, 1] when x0 is clipped).
    ``options`` are those of :func:`ancestral_progressive` (``t_start``, ``shared_noise``)."""
    check_eta("ancestral", eta)
    return chain.p_sample_loop(
        model,
        shape,
        generator=generator,
        device=device,
        clip_denoised=clip_denoised,
        x_start=x_start,
        progress=progress,
        callback=callback,
        **options,
    )


@torch.inference_mode()
def ddim_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM on ``chain``: eta = 0 is deterministic given x_T; eta = 1 is the ancestral sampler with the
    fixed-small variance. eps is recomputed from the (clipped) x0, as in Improved DDPM's
    implementation, so both views agree."""
    check_eta("ddim", eta)
    x = initial_sample(shape, generator, device, x_start)
    for n, i in enumerate(reverse_indices(chain.num_timesteps - 1, progress)):
        t = timestep_batch(i, shape[0], device)
        out = chain.predict(model, x, t, clip_denoised)
        eps = chain.pred_eps_from_x0(x, t, out.pred_x0)
        ab = chain.coef("alphas_cumprod", t, x.ndim)
        ab_prev = chain.coef("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        mean = out.pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        noise = randn_like(x, generator)
        x = mean + (sigma * noise if i > 0 else 0.0)
        if callback is not None:
            callback(n, i, x, out.pred_x0)
    return x


@torch.inference_mode()
def ddim_invert(
    chain: GaussianDiffusion, model: Model, x0: torch.Tensor, clip_denoised: bool = True
) -> torch.Tensor:
    """DDIM inversion (eta = 0): run the deterministic DDIM update upwards, from data to the latent x_T of
    ``chain``, so that ``ddim_sample_loop(chain, ..., x_start=latent)`` gives ``x0`` back. The step from
    t_{i-1} to t_i uses eps predicted at t_{i-1} (the generating step uses it at t_i), the usual
    approximation (diffusers' DDIMInverseScheduler with set_alpha_to_one).

    ``clip_denoised`` must be what the generating loop uses: clipping x0 changes eps, and a mismatch
    costs more than the approximation (RMSE 19 instead of 4 on 0..255 for Fashion-MNIST images, whose
    black background sits exactly at the clipping bound)."""
    # The generating loop's last step takes the first kept step to clean data (alphabar = 1), so the
    # first inverting step starts from clean data: x_{t_0} = sqrt(ab_0) x0 + sqrt(1 - ab_0) eps(x0, t_0).
    x = x0
    for i in range(chain.num_timesteps):
        t = timestep_batch(max(i - 1, 0), x.shape[0], x.device)
        out = chain.predict(model, x, t, clip_denoised)
        eps = chain.pred_eps_from_x0(x, t, out.pred_x0)
        start = x0 if i == 0 else out.pred_x0
        ab_next = chain.coef("alphas_cumprod", torch.full_like(t, i), x.ndim)
        x = start * torch.sqrt(ab_next) + torch.sqrt(1 - ab_next) * eps
    return x


# ---- the DPM-Solver family ----


def _solver_schedule(chain: GaussianDiffusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DPM-Solver's view of ``chain``, x_t = alpha_t x0 + sigma_t eps, in float64 at each of its steps:
    alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t) and the half log-SNR
    lambda_t = log(alpha_t / sigma_t), which the solvers step in."""
    ab = np.asarray(chain.alphas_cumprod, dtype=np.float64)
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


@torch.inference_mode()
def dpm_solver_pp_2m_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the probability-flow ODE in its data-prediction form, solved
    with a second-order multistep method in lambda = log(alpha_t / sigma_t). It evaluates the network at
    each step of ``chain``, from its last to its first, and then steps to clean data (sigma = 0). The
    first and that final step are first order (DDIM), as in diffusers' DPMSolverMultistepScheduler with
    lower_order_final."""
    check_eta("dpm++2m", eta)
    alpha, sigma, lam = _solver_schedule(chain)
    x = initial_sample(shape, generator, device, x_start)
    x0_prev = None
    for n, i in enumerate(reverse_indices(chain.num_timesteps - 1, progress)):
        x0 = chain.predict(model, x, timestep_batch(i, shape[0], device), clip_denoised).pred_x0
        if i == 0:  # to sigma = 0, where the first-order update is x0 itself
            if callback is not None:
                callback(n, i, x0, x0)
            return x0
        h = lam[i - 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = (lam[i] - lam[i + 1]) / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigma[i - 1] / sigma[i]) * x - (alpha[i - 1] * np.expm1(-h)) * d
        x0_prev = x0
        if callback is not None:
            callback(n, i, x, x0)
    return x


@torch.inference_mode()
def sde_dpm_solver_pp_2m_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = 1.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, section 5 of DPM-Solver++): the reverse SDE in data-prediction
    form with the second-order multistep (midpoint) update; each step from s to t (h = lambda_t - lambda_s)
    keeps exp(-h) of the current noise and adds fresh noise of std sigma_t sqrt(1 - exp(-2h)):

        x_t = (sigma_t / sigma_s) exp(-h) x_s + alpha_t (1 - exp(-2h)) D + sigma_t sqrt(1 - exp(-2h)) z

    with D the x0 prediction, extrapolated from the previous one after the first step. Like the ancestral
    sampler it forgets early errors, which the ODE solvers carry to the end; the final step goes to
    clean data (sigma = 0) as in diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").
    ``eta`` scales the noise as in k-diffusion (exp(-h) becomes exp(-h eta), 1 - exp(-2h) becomes
    1 - exp(-h (1 + eta)) for D and 1 - exp(-2 h eta) for the noise): 1 is the SDE, 0 the ODE
    (``dpm++2m``'s update), above 1 more of each step is fresh noise."""
    eta = check_eta("sde-dpm++2m", eta)
    alpha, sigma, lam = _solver_schedule(chain)
    x = initial_sample(shape, generator, device, x_start)
    x0_prev = None
    for n, i in enumerate(reverse_indices(chain.num_timesteps - 1, progress)):
        x0 = chain.predict(model, x, timestep_batch(i, shape[0], device), clip_denoised).pred_x0
        if i == 0:  # to sigma = 0: the update is x0 itself
            if callback is not None:
                callback(n, i, x0, x0)
            return x0
        h = lam[i - 1] - lam[i]
        d = x0
        if x0_prev is not None:
            r = (lam[i] - lam[i + 1]) / h
            d = x0 + (0.5 / r) * (x0 - x0_prev)
        x = (sigma[i - 1] / sigma[i] * np.exp(-h * eta)) * x + (alpha[i - 1] * -np.expm1(-h * (1 + eta))) * d
        if eta:
            x = x + (sigma[i - 1] * math.sqrt(-np.expm1(-2 * h * eta))) * randn_like(x, generator)
        x0_prev = x0
        if callback is not None:
            callback(n, i, x, x0)
    return x


@torch.inference_mode()
def sde_dpm_solver_pp_3m_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = 1.0,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): the reverse SDE of ``sde-dpm++2m`` with a third-order multistep update from
    the last three x0 predictions (exponential-integrator phi functions, as k-diffusion's
    sample_dpmpp_3m_sde). With h = lambda_t - lambda_s, g = h (1 + eta) and D1, D2 the first and second
    divided differences of the x0 predictions in lambda:

        x_t = (sigma_t / sigma_s) exp(-h eta) x_s + alpha_t [(1 - exp(-g)) D + phi2 D1 - phi3 D2]
              + sigma_t sqrt(1 - exp(-2 h eta)) z,   phi2 = 1 - (1 - exp(-g)) / g,   phi3 = phi2 / g - 1/2

    (first order at the first step, second at the next); the final step goes to clean data. ``eta`` as
    in ``sde-dpm++2m``: 1 the SDE, 0 the ODE, more adds noise."""
    eta = check_eta("sde-dpm++3m", eta)
    alpha, sigma, lam = _solver_schedule(chain)
    x = initial_sample(shape, generator, device, x_start)
    history: list[tuple[torch.Tensor, float]] = []  # (x0 prediction, the h of the step that followed it)
    for n, i in enumerate(reverse_indices(chain.num_timesteps - 1, progress)):
        x0 = chain.predict(model, x, timestep_batch(i, shape[0], device), clip_denoised).pred_x0
        if i == 0:  # to sigma = 0: the update is x0 itself
            if callback is not None:
                callback(n, i, x0, x0)
            return x0
        h = lam[i - 1] - lam[i]
        g = h * (1 + eta)
        update = -np.expm1(-g) * x0
        phi2 = 1 + np.expm1(-g) / g
        if len(history) >= 2:
            (x0_1, h_1), (x0_2, h_2) = history[-1], history[-2]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            update = update + phi2 * d1 - (phi2 / g - 0.5) * d2
        elif history:
            x0_1, h_1 = history[-1]
            update = update + (phi2 * h / h_1) * (x0 - x0_1)
        x = (sigma[i - 1] / sigma[i] * np.exp(-h * eta)) * x + alpha[i - 1] * update
        if eta:
            x = x + (sigma[i - 1] * math.sqrt(-np.expm1(-2 * h * eta))) * randn_like(x, generator)
        history = [*history[-1:], (x0, h)]
        if callback is not None:
            callback(n, i, x, x0)
    return x


# ---- EDM's stochastic sampler ----

# Algorithm 2's other knobs (the noise level S_churn is the loop's eta). S_noise: EDM's 1.003 (ImageNet-64)
# makes up for a network that removes slightly too much noise; 1 adds exactly the noise that reaches the
# churned level, which an exact denoiser needs (the toy Gaussian in tests/test_churn.py).
EDM_S_NOISE = 1.0
# Churn only at noise levels sigma in [S_tmin, S_tmax]: everywhere, as EDM's defaults (its ImageNet-64
# setting is [0.05, 50]). Near t = 0 the discrete chain's levels are too far apart for a small churn to
# reach the next one, so there it rounds back to no churn anyway (see below).
EDM_S_TMIN = 0.0
EDM_S_TMAX = math.inf


def _full_chain(chain: GaussianDiffusion) -> tuple[GaussianDiffusion, np.ndarray]:
    """The diffusion ``chain`` was respaced from (``chain.full_chain``) and each chain step's index in it."""
    full = chain.full_chain
    return full, np.searchsorted(full.timestep_map, chain.timestep_map)


def _round_level(levels: np.ndarray, target: float, lowest: int) -> int:
    """The index of the level nearest to ``target`` in the increasing ``levels`` (EDM's ``round_sigma``),
    but not below ``lowest`` (the level the churn starts from)."""
    above = int(np.searchsorted(levels, target))  # the first level >= target
    if above >= len(levels):
        return len(levels) - 1
    if above > 0 and target - levels[above - 1] <= levels[above] - target:
        above -= 1
    return max(above, lowest)


@torch.inference_mode()
def edm_churn_sample_loop(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    eta: float = ETA_DEFAULTS["edm"],
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's method on the probability-flow
    ODE in EDM's variables, with "churn" (noise added, then removed by the ODE step) at each step.
    ``eta`` is S_churn; 0 is the deterministic Heun sampler (EDM's Algorithm 1).

    The VP chain is taken to EDM's: sigma = sqrt((1 - alphabar) / alphabar) and x = x_t / sqrt(alphabar),
    so that x = x0 + sigma eps, and the denoiser D(x, sigma) is the chain's x0 prediction for
    x_t = x sqrt(alphabar) at that timestep (``clip_denoised`` clips it). The noise levels are the
    chain's steps, from its last to its first, and then sigma = 0. Step i from sigma_i to sigma_{i+1}:

        gamma = min(eta / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
        sigma_hat = sigma_i (1 + gamma), rounded to the nearest noise level of the full diffusion
        x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
        d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat;   x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
        and when sigma_{i+1} > 0, Heun's correction: d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1},
        x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2

    The churned level sigma_hat is between the chain's steps, where a network trained on T discrete
    timesteps cannot be evaluated: as EDM does for its discrete-time (iDDPM) models (the preconditioner's
    ``round_sigma``), it is rounded to the nearest of the T noise levels of the diffusion the chain was
    respaced from (``chain.full_chain``), and exactly the noise that reaches the rounded level is added
    (S_noise = 1); a churn too small to reach the next level adds none.

    N steps evaluate the network 2N - 1 times (the last step, to sigma = 0, is Euler's: its update is
    D itself), against N for the other samplers: compare them at equal evaluations. ``x_start`` is x_T in
    the VP scale (the chain's last step); ``callback`` gets each step's x back in that scale and the
    x0 prediction D at the step's (churned) start."""
    eta = check_eta("edm", eta)
    full, index = _full_chain(chain)
    ab = np.asarray(full.alphas_cumprod, dtype=np.float64)
    levels = np.sqrt((1 - ab) / ab)  # increasing with the timestep
    steps = chain.num_timesteps
    gamma = min(eta / steps, math.sqrt(2) - 1)

    def denoise(x, j):  # D(x, sigma_j) at level j of the full diffusion
        x_t = x * math.sqrt(ab[j])
        return full.predict(model, x_t, timestep_batch(j, shape[0], device), clip_denoised).pred_x0

    x = initial_sample(shape, generator, device, x_start) / math.sqrt(ab[index[-1]])
    for n, i in enumerate(reverse_indices(steps - 1, progress)):
        sigma = levels[index[i]]
        j = int(index[i])
        if gamma > 0 and EDM_S_TMIN <= sigma <= EDM_S_TMAX:
            j = _round_level(levels, sigma * (1 + gamma), j)
            if j != index[i]:
                noise = math.sqrt(levels[j] ** 2 - sigma**2) * EDM_S_NOISE
                x = x + noise * randn_like(x, generator)
        sigma_hat = levels[j]
        x0 = denoise(x, j)
        if i == 0:  # to sigma = 0: the Euler step lands on D
            if callback is not None:
                callback(n, i, x0, x0)
            return x0
        sigma_next = levels[index[i - 1]]
        d = (x - x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        d_next = (x_next - denoise(x_next, int(index[i - 1]))) / sigma_next
        x = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        if callback is not None:
            callback(n, i, x * math.sqrt(ab[index[i - 1]]), x0)
    return x  # (a chain always has a step 0, which returns above)


# ---- the registry ----

SampleLoop = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """A sampler by name: its loop, the spacing it uses unless told, and how it picks the timesteps
    that ``--steps N`` keeps."""

    loop: SampleLoop
    default_spacing: str
    timesteps: Callable[..., list[int]]
    summary: str


# The paper's samplers stride evenly; DPM-Solver needs its steps spread evenly in log-SNR (with
# diffusers' linspace timesteps it under-disperses a toy Gaussian by 20-50% at 25-10 steps; logsnr is
# within 3%).
SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(ancestral_sample_loop, "linspace", timestep_subset, "the paper's Algorithm 2"),
    "ddim": Sampler(ddim_sample_loop, "linspace", timestep_subset, "DDIM, Song et al. 2021"),
    "dpm++2m": Sampler(
        dpm_solver_pp_2m_sample_loop,
        "logsnr",
        solver_timesteps,
        "DPM-Solver++(2M), Lu et al. 2022, good in 10-25 steps",
    ),
    "sde-dpm++2m": Sampler(
        sde_dpm_solver_pp_2m_sample_loop,
        "logsnr",
        solver_timesteps,
        "SDE-DPM-Solver++(2M), its stochastic variant (noise added each step, like Algorithm 2)",
    ),
    "sde-dpm++3m": Sampler(
        sde_dpm_solver_pp_3m_sample_loop,
        "linspace",
        solver_timesteps,
        "SDE-DPM-Solver++(3M), third-order multistep for the reverse SDE",
    ),
    # EDM's schedule: its N noise levels even in sigma^(1/7) from sigma_max (t = T-1) to sigma_min (t = 0),
    # both kept, then sigma = 0; solver_timesteps would be the same on karras, not on linspace or leading.
    "edm": Sampler(
        edm_churn_sample_loop,
        "karras",
        timestep_subset,
        "EDM's stochastic sampler, Karras et al. 2022 (Heun steps with churn; N steps = 2N - 1 evaluations)",
    ),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampling_chain(
    diffusion: GaussianDiffusion, sampler: str, steps: int | None, spacing: str | None = None
) -> GaussianDiffusion:
    """The (respaced) chain ``sampler`` walks: ``steps`` timesteps picked by ``spacing`` (the sampler's
    default when None), or all T when ``steps`` is None."""
    chosen = get_sampler(sampler)
    T = diffusion.num_timesteps
    if steps is None or steps == T:
        return diffusion
    kept = chosen.timesteps(T, steps, spacing or chosen.default_spacing, diffusion.alphas_cumprod)
    return diffusion.respaced(kept)
