"""Samplers beyond Algorithm 2. DDIM (Song et al. 2021) is an option with its own name; the
ancestral sampler of the paper lives in :mod:`ddpm.diffusion`.

Every sampler runs on a subset of the training timesteps chosen by a named spacing; the subset is a
respaced chain (:meth:`GaussianDiffusion.respaced`), so each step goes to the next kept timestep.
"""

from __future__ import annotations

import numpy as np
import torch

from .diffusion import GaussianDiffusion, Model, randn, randn_like, space_timesteps
from .errors import ConfigError

SPACINGS = ("linspace", "leading", "trailing")


def timestep_subset(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """``steps`` of the timesteps 0..T-1: "linspace" spreads them from 0 to T-1 (Improved DDPM),
    "leading" takes 0, T/n, 2T/n, ... (DDIM's paper), "trailing" ends exactly at T-1 (Lin et al. 2024)."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"number of sampling steps must be in 1..{T}, got {steps}")
    if spacing == "linspace":
        return space_timesteps(T, steps)
    if spacing == "leading":
        kept = np.arange(steps) * (T // steps)
    elif spacing == "trailing":
        kept = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted({int(t) for t in kept})


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
