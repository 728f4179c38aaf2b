"""The condition of a super-resolution stage in cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion
Models for High Fidelity Image Generation").

The stage's U-Net sees, concatenated to x_t, the low-resolution image upsampled to its own size and noised
to an augmentation level s (noise-conditioning augmentation), and s itself through an embedding added to
the time embedding. Training draws s at random for each example, so the stage learns to repair the
artefacts a base model's samples have rather than trusting every low-resolution pixel; sampling uses one
small fixed s. The noise follows the stage's own schedule: level s noises like q(x_{s-1} | x_0), and
level 0 is the clean image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import match_images
from ..errors import ConfigError
from ..images import to_model_range
from ..rng import SEED_AUGMENTATION, generator, to_device


@dataclass
class LowResImage:
    """A batch of super-resolution conditions: ``image`` [B, C, H, W] (upsampled, noised, model range) and
    ``level`` [B] (int64, the augmentation level). A ``Condition`` (ddpm.conditioning.condition)."""

    image: torch.Tensor
    level: torch.Tensor

    def to(self, device) -> LowResImage:
        return LowResImage(self.image.to(device), self.level.to(device))

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, rows) -> LowResImage:
        return LowResImage(self.image[rows], self.level[rows])

    def repeat_to(self, n: int) -> LowResImage:
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} low-resolution images for a batch of {n}")
        return LowResImage(self.image.expand(n, -1, -1, -1), self.level.expand(n))

    @staticmethod
    def cat(items: list[LowResImage]) -> LowResImage:
        return LowResImage(torch.cat([i.image for i in items]), torch.cat([i.level for i in items]))

    def chunk(self, n: int) -> list[LowResImage]:
        return [LowResImage(i, s) for i, s in zip(self.image.chunk(n), self.level.chunk(n), strict=True)]


def downsample(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized to ``size`` exactly as the data of a base model at that size is made
    (antialiased bilinear, rounded to uint8), so that the stage trains on what the base model learnt."""
    return match_images(images_uint8, size, None)


def augmentation_alphas(alphas_cumprod) -> torch.Tensor:
    """abar for each augmentation level: 1 at level 0 (clean), abar_{s-1} at level s."""
    return torch.cat(
        [torch.ones(1, dtype=torch.float64), torch.as_tensor(alphas_cumprod, dtype=torch.float64)]
    )


def low_res_condition(
    low: torch.Tensor, size: int, level: torch.Tensor, noise: torch.Tensor, alphas_cumprod
) -> LowResImage:
    """The condition for low-resolution images ``low`` ([B, C, h, w], model range): upsampled
    (bilinear) to ``size``, then noised to ``level`` ([B] ints) with ``noise`` ([B, C, size, size])."""
    up = F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False)
    level = to_device(level, up.device)  # (pinned, non-blocking: run every training step)
    abar = to_device(augmentation_alphas(alphas_cumprod), up.device)[level]
    abar = abar.to(up.dtype)[:, None, None, None]
    return LowResImage(abar.sqrt() * up + (1 - abar).sqrt() * noise.to(up), level.long())


def conditions_for(
    low_uint8: torch.Tensor, model_cfg, size: int, alphas_cumprod, seed: int = 0, level: int | None = None
) -> LowResImage:
    """What a super-resolution stage (``model_cfg``: its model config) samples from: uint8 images
    ([N, C, h, w], at the stage's low resolution or larger, then downsampled as its training data was)
    noised to ``level`` (default: the stage's model.low_res_noise) with noise seeded by ``seed``."""
    low_res = model_cfg.low_res
    if low_uint8.ndim != 4 or low_uint8.dtype != torch.uint8:
        raise ConfigError(
            f"low-resolution images must be uint8 [N, C, H, W], got {low_uint8.dtype} "
            f"{tuple(low_uint8.shape)}"
        )
    if min(low_uint8.shape[-2:]) < low_res:
        raise ConfigError(
            f"low-resolution images of {low_uint8.shape[-2]}x{low_uint8.shape[-1]} for a stage that "
            f"upsamples {low_res}x{low_res} images"
        )
    level = model_cfg.low_res_noise if level is None else level
    if not 0 <= level < len(alphas_cumprod) + 1:
        raise ConfigError(f"the low-resolution noise level must be in 0..{len(alphas_cumprod)}, got {level}")
    low = to_model_range(downsample(low_uint8, low_res))
    noise = torch.randn((len(low), low.shape[1], size, size), generator=generator(seed, SEED_AUGMENTATION, 0))
    return low_res_condition(low, size, torch.full((len(low),), level), noise, alphas_cumprod)
