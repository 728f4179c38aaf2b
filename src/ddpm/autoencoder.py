"""The first stage of latent diffusion (Rombach et al. 2022): a small KL-regularised convolutional
autoencoder, and the interface through which latent diffusion uses it or a diffusers ``AutoencoderKL``.

The encoder maps an image in [-1, 1] to the mean and log-variance of a diagonal Gaussian over latents
2^(levels - 1) times smaller on each side (28x28 -> 7x7 with three levels); the decoder maps a latent back.
Training minimises the per-pixel L1 reconstruction error of a latent drawn from that Gaussian plus a
small weight times its KL divergence from N(0, I), which keeps the latent space smooth without shrinking it
to a point. (Rombach et al. add a perceptual and an adversarial loss for natural images; neither is used
here.) Latents are scaled to unit variance before diffusion, by a factor measured on the training data
and recorded with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Downsample, Upsample, conv, group_norm


class Block(nn.Module):
    """A residual block without a time embedding (GroupNorm, SiLU, 3x3 conv, twice)."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, num_groups), conv(in_ch, out_ch)
        self.norm2, self.conv2 = group_norm(out_ch, num_groups), conv(out_ch, out_ch)
        self.skip = conv(in_ch, out_ch, kernel=1, padding=0) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Autoencoder(nn.Module):
    """``encode(x) -> (mean, logvar)``, ``decode(z) -> x``; ``forward(x, noise)`` is the training pass: the
    per-example loss terms [B, 2] (mean absolute reconstruction error of z = mean + std * noise, and the KL
    divergence of the posterior from N(0, I) summed over the latent)."""

    def __init__(
        self,
        channels: int = 1,
        ch: int = 32,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        num_groups: int = 8,
    ):
        super().__init__()
        self.channels, self.latent_channels = channels, latent_channels
        self.factor = 2 ** (len(ch_mult) - 1)
        widths = [ch * m for m in ch_mult]
        down: list[nn.Module] = [conv(channels, widths[0])]
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(Block(current, width, num_groups))
                current = width
            if level < len(widths) - 1:
                down.append(Downsample(current, with_conv=True))
        down += [Block(current, current, num_groups), group_norm(current, num_groups), nn.SiLU()]
        down.append(conv(current, 2 * latent_channels))
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [conv(latent_channels, current), Block(current, current, num_groups)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                up.append(Block(current, width, num_groups))
                current = width
            if level > 0:
                up.append(Upsample(current, with_conv=True))
        up += [group_norm(current, num_groups), nn.SiLU(), conv(current, channels)]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        reconstruction = (self.decode(z).float() - x.float()).abs().flatten(1).mean(1)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
        return torch.stack([reconstruction, kl], dim=1)


def autoencoder_loss(terms: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """The per-example training loss from the training pass's terms ([B, 2]: reconstruction, KL)."""
    return terms[:, 0] + kl_weight * terms[:, 1]
