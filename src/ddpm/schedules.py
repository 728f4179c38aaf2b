"""Beta schedules: functions of the number of steps T that return float64 numpy arrays of beta_t.

The paper's schedules are those of the original code (`diffusion_utils.get_beta_schedule`): linear
(the default, 1e-4 -> 0.02), quadratic, constant, the two warm-up schedules.
The cosine schedule is from Improved DDPM (Nichol & Dhariwal 2021, Eq. 17) and is an option only.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

SCHEDULES = ("linear", "quad", "const", "warmup10", "warmup50", "cosine")


def _warmup_betas(beta_start: float, beta_end: float, T: int, warmup_frac: float) -> np.ndarray:
    betas = beta_end * np.ones(T, dtype=np.float64)
    warmup_steps = int(T * warmup_frac)
    betas[:warmup_steps] = np.linspace(beta_start, beta_end, warmup_steps, dtype=np.float64)
    return betas


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: alphabar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2)."""

    def alphabar(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alphabar(i + 1) / alphabar(i), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


def make_betas(
    schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Return beta_1..beta_T (code index 0..T-1) as float64, validated to lie in (0, 1)."""
    T = num_timesteps
    if not isinstance(T, int) or T <= 0:
        raise ConfigError(f"num_timesteps must be a positive integer, got {T!r}")
    if schedule != "cosine":
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 < value < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {value}")
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif schedule == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif schedule == "warmup10":
        betas = _warmup_betas(beta_start, beta_end, T, 0.1)
    elif schedule == "warmup50":
        betas = _warmup_betas(beta_start, beta_end, T, 0.5)
    elif schedule == "cosine":
        betas = cosine_betas(T)
    else:
        raise ConfigError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ConfigError(f"schedule {schedule!r} gives betas outside (0, 1); check beta_start/beta_end")
    return betas
