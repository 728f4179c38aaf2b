"""Build the model and the diffusion that a config describes."""

from __future__ import annotations

from torch import nn

from .config import Config, validate
from .diffusion import GaussianDiffusion, VarType
from .mlp import MLPDenoiser
from .schedules import make_betas
from .unet import UNet


def build_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    betas = make_betas(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)
    return GaussianDiffusion(betas, d.mean_type, d.var_type, d.loss_type, d.hybrid_lambda)


def build_model(cfg: Config, channels: int) -> nn.Module:
    """The denoiser for data with ``channels`` channels (2 for 2-D points); output channels are
    doubled when the variance is learned."""
    validate(cfg)
    learned = build_diffusion(cfg).var_type in (VarType.LEARNED, VarType.LEARNED_RANGE)
    out = channels * (2 if learned else 1)
    m = cfg.model
    if m.kind == "mlp":
        return MLPDenoiser(dim=channels, hidden=m.mlp_hidden, layers=m.mlp_layers, out_dim=out)
    return UNet(
        in_channels=channels,
        out_channels=out,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resolution=cfg.data.image_size,
        resamp_with_conv=m.resamp_with_conv,
        num_groups=m.num_groups,
    )
