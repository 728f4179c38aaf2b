"""Training a denoiser (Algorithm 1) on pixels, on an autoencoder's latents, or as a super-resolution
stage, unconditional or conditioned on classes or captions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..build import build_diffusion, build_model
from ..conditioning import make_conditioner, with_condition
from ..conditioning.low_res import conditions_for, downsample, low_res_condition
from ..config import Config, check_levels
from ..diffusion import lognormal_timesteps
from ..errors import ConfigError
from ..images import plot_points, save_class_grid, save_grid, to_model_range, to_uint8
from ..rng import to_device
from ..sample import generate
from .base import Batch, TaskContext
from .source import Examples, flipped, flips, in_memory


class Latents:
    """A latent diffusion run's data: every training image (and its mirror image, with flips on)
    encoded once by the frozen autoencoder; a step draws each example's latent from its posterior."""

    def __init__(self, cfg: Config, examples: Examples, context: TaskContext):
        from ..latent import encode_images, run_autoencoder

        in_memory(cfg, "latent diffusion encodes its dataset once")
        ae = run_autoencoder(cfg, context.run_dir, context.device)
        channels, size = examples.shape[0], cfg.data.image_size
        if channels != ae.channels or size % ae.factor:
            raise ConfigError(
                f"autoencoder {cfg.model.autoencoder} takes {ae.channels}-channel images of a size divisible "
                f"by {ae.factor}; the data has {channels} channels of {size}x{size}"
            )
        cfg.model.latent_channels, cfg.model.latent_size = ae.latent_channels, size // ae.factor
        cfg.data.channels = channels  # of the images, not of the latents
        check_levels(cfg.model, cfg.model.latent_size, "model.latent_size")
        images = to_model_range(examples.data)
        sides = [images, images.flip(3)] if cfg.data.random_flip else [images]
        encoded = [encode_images(ae, side) for side in sides]
        self.mean, self.logvar = (torch.stack(part) for part in zip(*encoded, strict=True))
        self.autoencoder = ae
        self.shape = (ae.latent_channels, size // ae.factor, size // ae.factor)

    def draw(self, indices, flip, mine: slice, eps: torch.Tensor) -> torch.Tensor:
        """The scaled latents of this process's examples (their mirror images' where flipped)."""
        device = self.mean.device
        rows = to_device(indices[mine], device)
        side = to_device(flip[mine].long(), device) if flip is not None else torch.zeros_like(rows)
        mean, logvar = self.mean[side, rows], self.logvar[side, rows]
        return (mean + torch.exp(0.5 * logvar) * to_device(eps, device)) * self.autoencoder.scale


class DiffusionTask:
    def __init__(self, cfg: Config, context: TaskContext):
        self.cfg, self.context = cfg, context
        self.examples = Examples(cfg, context)
        self.conditioner = make_conditioner(cfg, context.run_dir)
        self.labels = None  # a conditional run's: rows, the null row, their conditions, grids
        dataset = self.examples.dataset
        if cfg.data.labels == "captions" or (dataset is not None and dataset.labels is not None):
            self.labels = self.conditioner.for_training(dataset, context.device)
        self.latents = Latents(cfg, self.examples, context) if cfg.model.autoencoder else None
        cfg.data.channels = cfg.data.channels or self.examples.shape[0]
        self.example_shape = self.latents.shape if self.latents else self.examples.shape
        self.diffusion = build_diffusion(cfg)

    def build_network(self) -> nn.Module:
        tower = None
        if self.cfg.model.text_tower != "frozen":  # trained with the denoiser, from its weights or anew
            tower = self.conditioner.encoder.tower(fresh=self.cfg.model.text_tower == "scratch")
        return build_model(self.cfg, self.example_shape[0], tower)

    def keep_parts(self) -> None:
        if self.cfg.data.labels == "captions":
            self.conditioner.keep()
        if self.latents is not None:
            from ..latent import keep_autoencoder

            keep_autoencoder(self.latents.autoencoder, self.context.run_dir)

    def batch(self, step: int, g: torch.Generator) -> Batch:
        """The randoms of the whole global batch are drawn (flips, t, noise, then condition dropout or
        augmentation levels and noise, or the latents' noise) and sliced, so they do not depend on the
        process count; an unconditional run draws exactly what it always did."""
        B, device, m = self.cfg.train.batch_size, self.context.device, self.cfg.model
        indices = self.examples.indices(step)
        flip = flips(self.examples, B, g)
        d = self.cfg.diffusion
        if d.timestep_sampling == "lognormal":
            ab = self.diffusion.alphas_cumprod
            t = lognormal_timesteps(ab, B, g, d.lognormal_mean, d.lognormal_std)
        else:  # Algorithm 1's uniform t
            t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g)
        noise = torch.randn((B, *self.example_shape), generator=g)
        mine = self.context.share(B)
        t, noise = to_device(t[mine], device), to_device(noise[mine], device)
        cond = None
        if self.labels is not None:  # condition dropout: some examples train the null class (or text "")
            drop = torch.rand(B, generator=g) < self.cfg.train.cond_dropout
            cond = to_device(torch.where(drop, self.labels.null, self.labels.ids[indices])[mine], device)
        if m.low_res:  # noise-conditioning augmentation: a random level per example
            level = torch.randint(0, m.low_res_noise_max, (B,), generator=g)[mine]
            augmentation = torch.randn((B, *self.example_shape), generator=g)[mine]
        if self.latents is not None:
            eps = torch.randn((B, *self.example_shape), generator=g)[mine]
            return Batch(self.latents.draw(indices, flip, mine, eps), t, noise, cond)
        x = self.examples.take(step, indices, mine)
        if not self.examples.is_image:  # 2-D points
            return Batch(x, t, noise, cond)
        if m.low_res:
            low = flipped(to_model_range(downsample(x, m.low_res)), flip, mine)
        x = flipped(to_model_range(x), flip, mine)
        if m.low_res:
            alphas = self.diffusion.np["alphas_cumprod"]
            cond = low_res_condition(low, x.shape[-1], level, to_device(augmentation, device), alphas)
        return Batch(x, t, noise, cond)

    def loss(self, network, batch: Batch) -> torch.Tensor:
        if batch.cond is not None:  # rows (-> ClassIds, or text encodings), or a LowResImage
            cond = self.labels.inputs(batch.cond) if self.labels is not None else batch.cond
            network = with_condition(network, cond)
        return self.diffusion.training_losses(network, batch.x, batch.t, batch.noise)["loss"]

    def preview(self, ema_model, path: Path) -> Path | None:
        """A grid (or scatter plot) of samples from the EMA model with a fixed seed; conditional runs get
        a row per class or prompt (plain conditional samples, w = 0), a super-resolution stage the first
        training images downsampled. Every process draws its share of the batches."""
        t, n = self.cfg.train, self.cfg.train.num_sample_images
        labels = cond = None
        if self.labels is not None:
            labels, cond = self.labels.grid(n)
        elif self.cfg.model.low_res:
            cond = self.low_res_examples(n)
        samples = generate(
            ema_model(),
            self.diffusion,
            n,
            self.example_shape,
            batch_size=256,
            seed=t.seed,
            steps=t.sample_steps,
            device=self.context.device,
            # 2-D points and latents are not bounded to [-1, 1]
            clip_denoised=self.examples.is_image and self.latents is None,
            precision=t.precision,
            procs=self.context.procs,
            cond=cond,
        )
        if samples is None:  # not the main process
            return None
        path.parent.mkdir(exist_ok=True)
        if self.latents is not None:
            from ..latent import decode_latents

            samples = decode_latents(self.latents.autoencoder, samples, self.context.device)
        if self.examples.is_image and labels is not None:
            save_class_grid(to_uint8(samples), labels, path)
        elif self.examples.is_image:
            save_grid(to_uint8(samples), path)
        else:
            plot_points(samples, path, reference=self.examples.dataset.data[:2000].cpu())
        return path

    def low_res_examples(self, n: int):
        """A super-resolution stage's grid conditions: the first ``n`` training images (or of the
        stream), downsampled and noised to the sampling level with a fixed generator."""
        images = self.examples.first(n)
        if len(images) < n:
            images = images.repeat((n + len(images) - 1) // len(images), 1, 1, 1)[:n]
        alphas = self.diffusion.np["alphas_cumprod"]
        return conditions_for(images, self.cfg.model, images.shape[-1], alphas, self.cfg.train.seed)

    def checkpoint_state(self, ema_model) -> dict:
        return {}

    def finish(self) -> dict:
        return {}
