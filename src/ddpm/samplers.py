"""Samplers beyond Algorithm 2: DDIM (Song et al. 2021) with its inversion, and DPM-Solver++(2M)
(Lu et al. 2022), each an option with its own name; the ancestral sampler of the paper lives in
:mod:`ddpm.diffusion`.

Every sampler runs on a subset of the training timesteps chosen by a named spacing; the subset is a
respaced chain (:meth:`GaussianDiffusion.respaced`), so each step goes to the next kept timestep.
"""

from __future__ import annotations

import numpy as np
import torch

from .diffusion import GaussianDiffusion, Model, randn, randn_like, space_timesteps
from .errors import ConfigError

SPACINGS = ("linspace", "leading", "trailing", "logsnr")
SAMPLERS = ("ancestral", "ddim", "dpm++2m")


def timestep_subset(
    num_timesteps: int, steps: int, spacing: str = "linspace", alphas_cumprod=None
) -> list[int]:
    """``steps`` of the timesteps 0..T-1: "linspace" spreads them from 0 to T-1 (Improved DDPM),
    "leading" takes 0, T/n, 2T/n, ... (DDIM's paper), "trailing" ends exactly at T-1 (Lin et al. 2024),
    "logsnr" spaces them evenly in log(alphabar / (1 - alphabar)) from T-1 to 0 (DPM-Solver's choice;
    needs ``alphas_cumprod``), which puts many more steps near t = 0 than the others."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"number of sampling steps must be in 1..{T}, got {steps}")
    if spacing == "linspace":
        return space_timesteps(T, steps)
    if spacing == "leading":
        kept = np.arange(steps) * (T // steps)
    elif spacing == "trailing":
        kept = np.round(T - np.arange(steps) * (T / steps)) - 1  # (arange with a float step can overshoot)
    elif spacing == "logsnr":
        if alphas_cumprod is None:
            raise ConfigError("logsnr spacing needs the noise schedule (alphas_cumprod)")
        ab = np.asarray(alphas_cumprod, dtype=np.float64)
        log_snr = np.log(ab) - np.log1p(-ab)  # decreasing in t
        targets = np.linspace(log_snr[0], log_snr[-1], steps)
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
    if steps == num_timesteps or spacing == "logsnr":
        return timestep_subset(num_timesteps, steps, spacing, alphas_cumprod)
    if spacing == "trailing":
        return timestep_subset(num_timesteps, steps, spacing)
    return timestep_subset(num_timesteps, steps + 1, spacing)[1:]


@torch.inference_mode()
def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM on the (respaced) chain ``diffusion``: eta = 0 is deterministic given x_T; eta = 1 is the
    ancestral sampler with the fixed-small variance. eps is recomputed from the (clipped) x0, as in
    Improved DDPM's implementation, so both views agree."""
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    x = randn(shape, generator, device) if x_start is None else x_start.to(device)
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        out = diffusion.p_mean_variance(model(x, diffusion.model_timesteps(t)), x, t, clip_denoised)
        eps = diffusion.pred_eps_from_x0(x, t, out.pred_x0)
        ab = diffusion._get("alphas_cumprod", t, x.ndim)
        ab_prev = diffusion._get("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        mean = out.pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        noise = randn_like(x, generator)
        x = mean + (sigma * noise if i > 0 else 0.0)
    return x


@torch.inference_mode()
def ddim_invert(
    diffusion: GaussianDiffusion, model: Model, x0: torch.Tensor, clip_denoised: bool = True
) -> torch.Tensor:
    """DDIM inversion (eta = 0): run the deterministic DDIM update upwards, from data to the latent x_T of
    the (respaced) chain ``diffusion``, so that ``ddim_sample_loop(..., eta=0, x_start=latent)`` gives
    ``x0`` back. The step from t_{i-1} to t_i uses eps predicted at t_{i-1} (the generating step uses
    it at t_i), the usual approximation (diffusers' DDIMInverseScheduler with set_alpha_to_one).

    ``clip_denoised`` must be what the generating loop uses: clipping x0 changes eps, and a mismatch
    costs more than the approximation (RMSE 19 instead of 4 on 0..255 for Fashion-MNIST images, whose
    black background sits exactly at the clipping bound)."""
    # The generating loop's last step takes the first kept step to clean data (alphabar = 1), so the
    # first inverting step starts from clean data: x_{t_0} = sqrt(ab_0) x0 + sqrt(1 - ab_0) eps(x0, t_0).
    x = x0
    for i in range(diffusion.num_timesteps):
        t = torch.full((x.shape[0],), max(i - 1, 0), device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(model(x, diffusion.model_timesteps(t)), x, t, clip_denoised)
        eps = diffusion.pred_eps_from_x0(x, t, out.pred_x0)
        start = x0 if i == 0 else out.pred_x0
        ab_next = diffusion._get("alphas_cumprod", torch.full_like(t, i), x.ndim)
        x = start * torch.sqrt(ab_next) + torch.sqrt(1 - ab_next) * eps
    return x


@torch.inference_mode()
def dpm_solver_pp_2m_sample_loop(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the probability-flow ODE in its data-prediction form, solved
    with a second-order multistep method in lambda = log(alpha_t / sigma_t). It evaluates the network at
    each step of the (respaced) chain ``diffusion``, from its last to its first, and then steps to clean
    data (sigma = 0). The first and that final step are first order (DDIM), as in diffusers'
    DPMSolverMultistepScheduler with lower_order_final."""
    ab = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    lam = np.log(alpha) - np.log(sigma)
    x = randn(shape, generator, device) if x_start is None else x_start.to(device)
    x0_prev = None
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x0 = diffusion.p_mean_variance(model(x, diffusion.model_timesteps(t)), x, t, clip_denoised).pred_x0
        if i == 0:  # to sigma = 0, where the first-order update is x0 itself
            return x0
        h = lam[i - 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = (lam[i] - lam[i + 1]) / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sigma[i - 1] / sigma[i]) * x - (alpha[i - 1] * np.expm1(-h)) * d
        x0_prev = x0
    return x
