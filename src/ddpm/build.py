"""Build the model and the diffusion that a config describes, fresh or from a checkpoint, and a run's
network ready to call (``load_network``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint
from .config import Config, check_run_config, validate
from .diffusion import GaussianDiffusion, VarType, parse_option
from .errors import CheckpointError, ConfigError
from .mlp import MLPDenoiser
from .runtime import Network, ProbedPrecision, Runtime
from .schedules import make_betas
from .text import TextTowerDenoiser
from .unet import UNet


def build_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    betas = make_betas(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)
    return GaussianDiffusion(
        betas,
        d.mean_type,
        d.var_type,
        d.loss_type,
        d.hybrid_lambda,
        loss_weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
        sigma_data=d.sigma_data,
    )


def build_model(cfg: Config, channels: int, text_tower: nn.Module | None = None) -> nn.Module:
    """The denoiser for data with ``channels`` channels (2 for 2-D points); output channels are
    doubled when the variance is learned. A run that trains its text tower (model.text_tower finetune /
    scratch) gets the U-Net and ``text_tower`` as one ``TextTowerDenoiser``."""
    learned = parse_option(VarType, cfg.diffusion.var_type, "variance type").learned
    out = channels * (2 if learned else 1)
    m = cfg.model
    if m.kind == "mlp":
        return MLPDenoiser(dim=channels, hidden=m.mlp_hidden, layers=m.mlp_layers, out_dim=out)
    if m.kind == "autoencoder":
        from .autoencoder import Autoencoder

        return Autoencoder(
            channels, m.ch, tuple(m.ch_mult), m.num_res_blocks, m.latent_channels, m.num_groups
        )
    resolution = cfg.data.image_size
    if m.autoencoder:  # latent diffusion: the U-Net works on the autoencoder's latents
        channels, resolution = m.latent_channels, m.latent_size
        out = channels * (2 if learned else 1)
    unet = UNet(
        in_channels=channels,
        out_channels=out,
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resolution=resolution,
        resamp_with_conv=m.resamp_with_conv,
        num_groups=m.num_groups,
        num_classes=m.num_classes,
        context_dim=m.context_dim,
        pooled_dim=m.pooled_dim,
        low_res_channels=channels if m.low_res else 0,
    )
    if m.text_tower == "frozen":
        return unet
    if text_tower is None:
        raise ConfigError(
            f"model.text_tower={m.text_tower}: give the text tower to train (the run's encoder's)"
        )
    return TextTowerDenoiser(unet, text_tower)


def load_model(
    checkpoint: str | Path | Checkpoint,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    var_type: str | None = None,
    ema_width: float | None = None,
) -> tuple[nn.Module, GaussianDiffusion, Config]:
    """Rebuild the model and diffusion from a checkpoint; EMA weights by default (``ema_width``: the
    EMA of that width the run kept, train.ema_widths).

    ``var_type`` swaps one fixed reverse variance for the other (fixedsmall <-> fixedlarge), e.g. to
    sample imported weights whose scheduler names the other one; a learned variance cannot be swapped."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    check_run_config(ckpt.config, f"checkpoint {ckpt.path}")
    cfg = Config.from_dict(ckpt.config)
    if cfg.model.kind == "text-encoder":
        raise ConfigError(
            f"{ckpt.path.parent} is a text encoder run, not a diffusion model; name it as model.text_encoder"
        )
    if var_type is not None and var_type != cfg.diffusion.var_type:
        fixed = ("fixedsmall", "fixedlarge")
        if var_type not in fixed or cfg.diffusion.var_type not in fixed:
            raise ConfigError(f"only fixedsmall and fixedlarge can replace each other, not {var_type!r}")
        cfg.diffusion.var_type = var_type
    validate(cfg)
    tower = None
    if cfg.model.text_tower != "frozen":  # its architecture (the weights are the checkpoint's)
        from .encoders import run_text_encoder

        tower = run_text_encoder(cfg, ckpt.path.parent).tower(fresh=True)
    model = build_model(cfg, cfg.data.channels, tower)
    weights = ckpt.weights(use_ema, ema_width)
    load_weights(model, weights, "checkpoint weights do not fit its config")
    broken = [
        name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if broken:  # they would sample black images without a word
        raise CheckpointError(f"checkpoint {ckpt.path} has NaN or infinite weights ({', '.join(broken[:3])})")
    return model.to(device).eval(), build_diffusion(cfg), cfg


WEIGHTS = ("ema", "model")  # a checkpoint's weights: the EMA (what sampling uses), or the raw ones


@dataclass(frozen=True)
class LoadedNetwork:
    """A run's network ready to call, with what it was trained with: what ``load_network`` returns."""

    network: Network  # the model wrapped for ``runtime``: network(x, t, *cond)
    model: nn.Module  # the bare model with the loaded weights, on runtime.device, in eval mode
    diffusion: GaussianDiffusion
    cfg: Config
    checkpoint: Checkpoint
    weights: str  # "ema" or "model"
    runtime: Runtime  # its device resolved
    probed: ProbedPrecision | None = None  # precision "auto": the network as wrapped, which chooses

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def record(self) -> dict:
        """How the network ran, for a command's JSON record (``Runtime.record``)."""
        return self.runtime.record(self.probed)


def load_network(
    checkpoint: str | Path | Checkpoint,
    weights: str = "ema",
    runtime: Runtime | None = None,
    var_type: str | None = None,
    ema_width: float | None = None,
) -> LoadedNetwork:
    """The network of the run at ``checkpoint`` (its directory, its checkpoint file or a Checkpoint) with
    its ``weights`` ("ema", the default, or "model", the raw ones), on ``runtime``'s device and wrapped
    for its precision and speed options (default ``Runtime()``: auto, fp32); with its diffusion (``var_type``:
    see ``load_model``), config and checkpoint; ``ema_width``: with "ema", the EMA of that width the run
    kept (train.ema_widths). Sampling, inversion, the likelihood and the figures all
    load their network here."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    runtime = (runtime or Runtime()).resolve()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    model, diffusion, cfg = load_model(ckpt, weights == "ema", runtime.device, var_type, ema_width)
    network = runtime.wrap(model)
    probed = network if isinstance(network, ProbedPrecision) else None
    return LoadedNetwork(network, model, diffusion, cfg, ckpt, weights, runtime, probed)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], problem: str) -> None:
    """Load ``state`` into ``model``, every tensor and nothing else, or raise a one-line CheckpointError
    that starts with ``problem`` and names the first mismatches."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches; torch lists them on tab-indented lines
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{problem} ({'; '.join(lines[:2]) or e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{problem} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def require_pixel_diffusion(cfg: Config, what: str) -> None:
    """``what`` (a command) works on a diffusion model of pixels: refuse autoencoders and latent runs."""
    if cfg.model.kind == "autoencoder":
        raise ConfigError(
            f"{what} needs a diffusion run; this is an autoencoder (its reconstructions are in samples/)"
        )
    if cfg.model.autoencoder:
        raise ConfigError(
            f"{what} works in pixel space; this is a latent diffusion run (use ddpm sample or eval fid)"
        )
