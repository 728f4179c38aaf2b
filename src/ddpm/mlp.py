"""A small MLP noise predictor for 2-D point clouds (the teaching example)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import timestep_embedding


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) for points x_t of shape [B, dim]: the sinusoidal time embedding is projected
    and added to every hidden layer."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, out_dim: int | None = None):
        super().__init__()
        self.hidden = hidden
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.hidden).to(x.dtype))
        h = self.inp(x)
        for block, proj in zip(self.blocks, self.time_proj, strict=True):
            h = h + block(F.silu(h + proj(temb)))
        return self.out(F.silu(h))
