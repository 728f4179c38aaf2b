"""Samplers: the paper's ancestral sampler (Algorithm 2), DDIM (Song et al. 2021) with its inversion,
DPM-Solver++(2M) (Lu et al. 2022) and its stochastic SDE variants (2M, and 3M as in k-diffusion) with a
noise level, each under its own name in ``SAMPLERS``.

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
ETA_DEFAULTS = {"ddim": 0.0, "sde-dpm++2m": 1.0, "sde-dpm++3m": 1.0}
# The largest eta each takes. DDIM's is 1: its step noise sigma = eta * (the posterior's std) must leave
# 1 - alphabar_prev - sigma^2 >= 0 for the direction term's square root, which eta = 1 just keeps on the
# longest (respaced) steps; above it the square root is NaN and the images come out black. The SDE
# solvers take any eta mathematically (each step keeps exp(-h eta) of x_s), but by 10 they re-noise
# their x0 prediction almost completely every step at the usual 10-100 steps; 2-3 already over-disperse
# (tests/test_samplers.py), and values like 1e308 only overflow the step's arithmetic.
ETA_LIMITS = {"ddim": 1.0, "sde-dpm++2m": 10.0, "sde-dpm++3m": 10.0}


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
        why = (
            "1 is the ancestral sampler's noise; more leaves no variance for the step"
            if sampler == "ddim"
            else "1 is the reverse SDE; more re-noises each step further"
        )
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
