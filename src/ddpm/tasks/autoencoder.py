"""Training a latent diffusion run's autoencoder: L1 reconstruction plus a small KL to a standard normal,
on images in memory; its checkpoint records the latent scale, its finish reports reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..autoencoder import autoencoder_loss
from ..build import build_model
from ..config import Config
from ..files import write_json
from ..images import save_grid, to_model_range, to_uint8
from ..latent import LATENT_SCALE_SAMPLES, evaluate_reconstructions, measure_scale
from ..rng import sampling_generator, to_device
from .base import Batch, TaskContext
from .source import Examples, flipped, flips, in_memory


class AutoencoderTask:
    def __init__(self, cfg: Config, context: TaskContext):
        in_memory(cfg, "an autoencoder trains on data in memory")
        self.cfg, self.context = cfg, context
        self.examples = Examples(cfg, context)
        cfg.data.channels = cfg.data.channels or self.examples.shape[0]
        self.example_shape = self.examples.shape
        factor = 2 ** (len(cfg.model.ch_mult) - 1)
        _, height, width = self.example_shape
        self.latent_shape = (cfg.model.latent_channels, height // factor, width // factor)

    def build_network(self) -> nn.Module:
        return build_model(self.cfg, self.example_shape[0])

    def keep_parts(self) -> None:
        pass

    def batch(self, step: int, g: torch.Generator) -> Batch:
        B, device = self.cfg.train.batch_size, self.context.device
        flip = flips(self.examples, B, g)
        # Drawn and unused: keeps the random stream of the runs trained before the tasks existed, so
        # that resuming one stays bit-exact.
        torch.randint(0, self.cfg.diffusion.num_timesteps, (B,), generator=g)
        noise = torch.randn((B, *self.latent_shape), generator=g)  # of the posterior sample
        mine = self.context.share(B)
        x = to_model_range(self.examples.take(step, self.examples.indices(step), mine))
        return Batch(flipped(x, flip, mine), noise=to_device(noise[mine], device))

    def loss(self, network, batch: Batch) -> torch.Tensor:
        return autoencoder_loss(network(batch.x, batch.noise), self.cfg.model.kl_weight)

    @torch.no_grad()
    def preview(self, ema_model, path: Path) -> Path | None:
        """The first training images, each row above its reconstruction from the posterior mean."""
        if not self.context.procs.is_main:
            return None
        n = max(self.cfg.train.num_sample_images // 2, 1)
        images = to_model_range(self.examples.first(n))
        model = ema_model()
        reconstructions = model.decode(model.encode(images)[0]).clamp(-1, 1)
        rows = max(int(n**0.5), 1)
        pairs = [
            part for i in range(0, n, rows) for part in (images[i : i + rows], reconstructions[i : i + rows])
        ]
        path.parent.mkdir(exist_ok=True)
        save_grid(to_uint8(torch.cat(pairs)), path, nrow=rows)
        return path

    def checkpoint_state(self, ema_model) -> dict:
        """The latent scale, recorded with the weights: what latent diffusion scales by."""
        images = to_model_range(self.examples.first(LATENT_SCALE_SAMPLES))
        generator = sampling_generator(self.cfg.train.seed, 0)
        return {"latent_scale": measure_scale(ema_model(), images, generator)}

    def finish(self) -> dict:
        """The reconstruction report on the test split (RUN/reconstruction.json)."""
        c = self.context
        report = evaluate_reconstructions(
            c.run_dir, cache_dir=c.cache_dir, device=c.device, progress=c.progress
        )
        write_json(c.run_dir / "reconstruction.json", report)
        return {"reconstruction": report}
