"""Every random stream of the package, each derived from the user's seed and what it is for.

Training draws step s's randomness (batch order aside) from a generator seeded by (seed, s); sampling
draws batch b's from (seed, b). A resumed run therefore continues exactly, and a seed with a batch size
always gives the same samples. Noise is drawn on the generator's device, so a seed gives the same
noise on any device.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes for derived_seed, so that no two random streams share a seed.
SEED_BATCH_ORDER, SEED_STEP, SEED_DROPOUT, SEED_SAMPLING, SEED_CAPTIONS, SEED_AUGMENTATION = 1, 2, 3, 4, 5, 6


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, purpose, step), with no collisions between purposes
    or between nearby seeds, unlike seed + step arithmetic."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, purpose: int, index: int) -> torch.Generator:
    """A CPU generator for one (seed, purpose, index) stream."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose, index))


def step_generator(seed: int, step: int) -> torch.Generator:
    """Training step ``step``'s flips, timesteps and noise."""
    return generator(seed, SEED_STEP, step)


def sampling_generator(seed: int, index: int) -> torch.Generator:
    """Sampling batch ``index``'s noise (also the NLL's x_t draws and the figures' chains)."""
    return generator(seed, SEED_SAMPLING, index)


def seed_dropout(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's global generator, which dropout draws its masks from, for training step ``step`` on
    process ``rank`` (each process of a multi-process run has masks of its own; rank 0's are those of a
    single-process run)."""
    keys = (seed, SEED_DROPOUT, step) if rank == 0 else (seed, SEED_DROPOUT, step, rank)
    torch.manual_seed(derived_seed(*keys))


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` (randoms drawn on the CPU) on ``device``. To a GPU it goes through pinned memory without
    blocking: a copy from ordinary (pageable) memory first waits for the GPU to finish its queue, which
    would stall the host at every sampling or training step."""
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a seed gives the same noise anywhere)."""
    gen_device = generator.device if generator is not None else device
    return to_device(torch.randn(shape, generator=generator, device=gen_device), device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn(x.shape, generator, x.device).to(x.dtype)
