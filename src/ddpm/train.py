"""Training (Algorithm 1): Adam with linear warm-up, global-norm clipping, EMA, checkpoints and resume,
in one process or in several under torchrun (DistributedDataParallel).

Every random choice of step s (batch order, flips, timesteps, noise, dropout) comes from generators
seeded by (seed, s). A run resumed from a checkpoint therefore continues exactly as if it had never
stopped: on CPU the final weights are bit-identical. Under torchrun every process draws the whole
global batch's randoms from that generator and takes its own slice, so the process count changes
float rounding only, and a single process computes exactly what it always did.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
from pathlib import Path

import torch
from torch import nn

from .build import build_diffusion, build_model
from .checkpoint import CHECKPOINT_NAME, Checkpoint, load_optimizer_state, save_checkpoint
from .conditions import balanced_classes, grid_prompts
from .config import Config, validate
from .data import BatchOrder, Dataset, load_dataset
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError, DataError
from .files import write_json
from .images import plot_points, save_class_grid, save_grid, to_model_range, to_uint8
from .rng import sampling_generator, seed_dropout, step_generator, to_device
from .rundir import RunDirectory
from .runtime import init_processes, resolve_device, wrap_network
from .sample import generate
from .superres import conditions_for, downsample, low_res_condition

# With train.on_nonfinite = "skip", this many skipped steps in a row stop the run all the same.
MAX_CONSECUTIVE_SKIPS = 100


class EMA:
    """Exponential moving average of the parameters, starting from the initial weights (no warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None) -> None:
        """One step towards ``model``'s weights; ``weight``, a 0-dim device tensor in place of
        1 - decay, lets a skipped step move it by 0 without reading anything back."""
        shadows, values = [], []
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadows.append(shadow)
                values.append(value)
            else:
                shadow.copy_(value)
        # shadow = decay * shadow + (1 - decay) * value, for every tensor in a few kernels on a GPU (one
        # launch per tensor dominated the EMA's cost); bit-identical to a lerp_ per tensor
        if weight is None:
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)
        else:
            torch._foreach_lerp_(shadows, values, [weight] * len(shadows))

    def model_copy(self, model: nn.Module) -> nn.Module:
        import copy

        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(self.shadow)
        return ema_model.eval()


def learning_rate(
    step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", total_steps: int = 0
) -> float:
    """Linear warm-up from 0 over ``warmup_steps`` updates, then constant (the original code) or, with
    ``schedule="cosine"``, decaying along a half cosine to 0 at ``total_steps``."""
    lr = base_lr * min(step / warmup_steps, 1.0) if warmup_steps > 0 else base_lr
    if schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return lr


# What may change when a run is resumed: where and how long it runs, and what it logs. Anything else
# (data, model, diffusion, optimiser, seed) would silently continue a different experiment.
RESUMABLE_CHANGES = {
    "data.root",
    "train.steps",
    "train.time_limit_minutes",
    "train.device",
    "train.precision",
    "train.channels_last",
    "train.compile",
    "train.compile_mode",
    "train.fused_optimizer",
    "train.deferred_checks",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.num_sample_images",
    "train.sample_steps",
    "train.grad_accum",
    "train.on_nonfinite",
    "data.loader_workers",
}


def check_resume_changes(saved: dict, cfg: Config) -> None:
    new = cfg.to_dict()
    old_steps = saved.get("train", {}).get("steps")
    if cfg.train.lr_schedule == "cosine" and old_steps not in (None, cfg.train.steps):
        raise ConfigError(
            f"cannot change train.steps ({old_steps} -> {cfg.train.steps}) when resuming: with "
            "train.lr_schedule=cosine it sets the learning rate of every step; start a new run"
        )
    for section, values in saved.items():
        if not isinstance(values, dict):
            continue
        for key, old in values.items():
            value = new.get(section, {}).get(key)
            if isinstance(value, tuple):
                value = list(value)
            if value != old and f"{section}.{key}" not in RESUMABLE_CHANGES:
                raise ConfigError(
                    f"cannot change {section}.{key} ({old!r} -> {value!r}) when resuming; start a new run"
                )


class Trainer:
    """Owns one run directory: config.json, checkpoint.safetensors, metrics.jsonl, samples/.

    Under torchrun every process holds the model, the optimiser and the EMA (kept equal by
    DistributedDataParallel); only rank 0 touches the run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True):
        validate(cfg)
        self.run = RunDirectory(run_dir)
        self.run_dir = self.run.path
        self.device = resolve_device(cfg.train.device)
        self.procs = init_processes(self.device)
        self.progress = progress and self.procs.is_main
        t = cfg.train
        share = t.batch_size // self.procs.world_size
        if t.batch_size % self.procs.world_size or share % t.grad_accum:
            raise ConfigError(
                f"train.batch_size {t.batch_size} must split evenly over {self.procs.world_size} process(es) "
                f"and train.grad_accum={t.grad_accum} micro-batches each"
            )
        ckpt = None
        if resume:
            ckpt = Checkpoint(self.run_dir / CHECKPOINT_NAME)
            saved = ckpt.config
            if cfg.data.channels is None:  # "the data's own", which the run already resolved
                cfg.data.channels = saved.get("data", {}).get("channels")
            if cfg.data.labels == "classes" and not cfg.model.num_classes:  # resolved from the data, too
                cfg.model.num_classes = saved.get("model", {}).get("num_classes", 0)
                cfg.data.class_names = tuple(saved.get("data", {}).get("class_names", ()))
            if cfg.data.labels == "captions" and not cfg.model.context_dim:  # from the text encoder
                cfg.model.context_dim = saved.get("model", {}).get("context_dim", 0)
                cfg.data.class_names = tuple(saved.get("data", {}).get("class_names", ()))
            check_resume_changes(ckpt.config, cfg)
        elif (self.run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{self.run_dir} already holds a run; use --resume to continue it or pick --out"
            )
        self.cfg = cfg
        self._open_data(cfg)
        if cfg.data.channels is None:
            cfg.data.channels = self.example_shape[0]
        torch.manual_seed(cfg.train.seed)  # the initial weights
        tower = None
        if cfg.model.text_tower != "frozen":  # trained with the denoiser, from its weights or from scratch
            tower = self.text_encoder.tower(fresh=cfg.model.text_tower == "scratch")
        if cfg.model.kind == "text-encoder":
            from .clip import DomainClip, clip_config

            self.model = DomainClip(clip_config(cfg, self.example_shape[0]), self.tokenizer).to(self.device)
        else:
            self.model = build_model(cfg, self.example_shape[0], tower).to(self.device)
        if t.channels_last:  # before DistributedDataParallel registers the parameters' layout
            self.model.to(memory_format=torch.channels_last)
        self.ddp = None
        if self.procs.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        # The network as the maths calls it: with the precision and speed options of the config.
        trained = self.ddp or self.model
        self.network = wrap_network(
            trained, self.device, t.precision, t.channels_last, t.compile, t.compile_mode
        )
        self.diffusion: GaussianDiffusion = build_diffusion(cfg)
        # what a step minimises: the diffusion's loss, an autoencoder's (reconstruction + KL) or a text
        # encoder's (contrastive)
        self.objective = self.diffusion
        if cfg.model.kind == "autoencoder":
            from .autoencoder import AutoencoderObjective

            self.objective = AutoencoderObjective(cfg.model.kl_weight)
        if cfg.model.kind == "text-encoder":
            from .clip import ContrastiveObjective

            self.objective = ContrastiveObjective(self.caption_tokens)
        optimizer = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(
            self.model.parameters(),
            # fused: one kernel updates every parameter (the default, foreach, takes a few per group)
            **({"fused": True} if t.fused_optimizer else {}),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.ema = EMA(self.model, t.ema_decay)
        self.step = 0
        self.train_seconds = 0.0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.unchecked = []  # train.deferred_checks: (step, loss, grad norm) not yet read back
        if ckpt is not None:
            self._restore(ckpt)
        self.stop_signal: int | None = None
        problem = None
        if self.procs.is_main:
            # Owned from here on (checked last, so that bad input leaves no directory behind).
            try:
                self.run.lock()
                if not resume and (self.run_dir / CHECKPOINT_NAME).exists():  # written while we got ready
                    raise ConfigError(f"{self.run_dir} already holds a run; use --resume to continue it")
                self.run.remove_temporary_files()
                self.run.keep_metrics_up_to(self.step)
                write_json(self.run_dir / "config.json", cfg.to_dict())
                if self.captions is not None:
                    self._keep_text_encoder()
                if self.latents is not None:
                    from .latent import keep_autoencoder

                    keep_autoencoder(self.autoencoder, self.run_dir)
                if cfg.model.kind == "text-encoder":
                    from .clip import keep_tokenizer

                    keep_tokenizer(self.tokenizer, self.run_dir)
            except (ConfigError, OSError) as e:
                self.run.unlock()
                problem = e
        if self.procs.any(problem is not None)[0]:  # under torchrun, the others stop with rank 0
            raise problem or ConfigError(f"rank 0 could not take {self.run_dir} (its error says why)")

    def _open_data(self, cfg: Config) -> None:
        """The training data: in memory with its batch order, or shards streamed as training goes."""
        self.streamed = cfg.data.dataset == "shards"
        self.stream = None  # the shard stream, opened at the step training starts from
        self.labels = None  # class ids (or caption rows) of a conditional run
        self.captions = None  # a text-conditional run's caption encodings
        if self.streamed and cfg.data.labels != "none":
            raise DataError("shards carry no class labels (yet); train on them with data.labels=none")
        if self.streamed:
            from .shards import ShardIndex

            self.dataset = None
            index = ShardIndex.load(cfg.data.root)
            index.check(self.procs.world_size * max(cfg.data.loader_workers, 1))
            channels = cfg.data.channels or index.channels
            self.example_shape = (channels, cfg.data.image_size, cfg.data.image_size)
            self.is_image = True
        else:
            self.dataset: Dataset = load_dataset(cfg.data, seed=cfg.train.seed)
            self.example_shape = tuple(self.dataset.data.shape[1:])
            self.is_image = self.dataset.is_image
            self.order = BatchOrder(len(self.dataset), cfg.train.batch_size, cfg.train.seed)
            self.data = self.dataset.data.to(self.device)
            if cfg.model.kind == "text-encoder":  # trains on the captions' tokens, not on an encoding
                from .clip import TokenizedCaptions, run_tokenizer

                self.tokenizer = run_tokenizer(cfg, self.dataset.captions, self.run_dir)
                self.caption_tokens = TokenizedCaptions(self.tokenizer, self.dataset.captions).to(self.device)
            elif cfg.data.labels == "captions":
                self._open_captions(cfg)
            elif self.dataset.labels is not None:  # class-conditional: as many classes as the data has
                names = self.dataset.class_names
                if cfg.data.class_names and tuple(cfg.data.class_names) != tuple(names):
                    raise ConfigError(f"the data's classes {names} are not the run's {cfg.data.class_names}")
                if cfg.model.num_classes not in (0, len(names)):
                    raise ConfigError(f"model.num_classes={cfg.model.num_classes}; the data has {len(names)}")
                cfg.model.num_classes, cfg.data.class_names = len(names), tuple(names)
                self.labels = self.dataset.labels
        self.noise_shape = self.example_shape  # of the noise a step draws per example
        self.latents = None  # a latent diffusion run's posteriors: (mean, logvar) [orientations, N, ...]
        if cfg.model.kind == "autoencoder":  # the noise of the posterior sample, latent-shaped
            if self.streamed:
                raise DataError("an autoencoder trains on data in memory; it cannot stream shards (yet)")
            factor = 2 ** (len(cfg.model.ch_mult) - 1)
            channels, height, width = self.example_shape
            self.noise_shape = (cfg.model.latent_channels, height // factor, width // factor)
        if cfg.model.autoencoder:
            if self.streamed:
                raise DataError("latent diffusion encodes its dataset once; it cannot stream shards (yet)")
            self._open_latents(cfg)

    def _open_latents(self, cfg: Config) -> None:
        """Encode every training image (and its mirror image, with flips on) once with the frozen
        autoencoder: the posterior means and log-variances a step draws its latents from."""
        from .latent import encode_images, run_autoencoder

        ae = run_autoencoder(cfg, self.run_dir, self.device)
        channels, size = self.example_shape[0], cfg.data.image_size
        if channels != ae.channels or size % ae.factor:
            raise ConfigError(
                f"autoencoder {cfg.model.autoencoder} takes {ae.channels}-channel images of a size divisible "
                f"by {ae.factor}; the data has {channels} channels of {size}x{size}"
            )
        cfg.model.latent_channels, cfg.model.latent_size = ae.latent_channels, size // ae.factor
        cfg.data.channels = channels  # of the images, not of the latents
        validate(cfg)  # the U-Net's levels against the latent size
        images = to_model_range(self.data)
        sides = [images, images.flip(3)] if cfg.data.random_flip else [images]
        encoded = [encode_images(ae, side) for side in sides]
        self.latents = tuple(torch.stack(part) for part in zip(*encoded, strict=True))
        self.autoencoder = ae
        self.example_shape = self.noise_shape = (ae.latent_channels, size // ae.factor, size // ae.factor)

    def _open_captions(self, cfg: Config) -> None:
        """Encode every distinct caption once with the frozen text encoder (the run's own copy when
        resuming), or tokenize it once when the run trains its text tower; a step then only looks its
        captions up."""
        from .encoders import CaptionCache, run_text_encoder

        self.text_encoder = run_text_encoder(cfg, self.run_dir)
        if cfg.model.context_dim not in (0, self.text_encoder.width):
            raise ConfigError(
                f"model.context_dim={cfg.model.context_dim}; the text encoder gives {self.text_encoder.width}"
            )
        cfg.model.context_dim = self.text_encoder.width
        self.captions = CaptionCache(self.text_encoder, self.dataset.captions).to(self.device)
        self.labels = self.captions.ids
        if self.dataset.class_names:  # kept for the grids' prompts and for evaluation
            cfg.data.class_names = tuple(self.dataset.class_names)

    def _keep_text_encoder(self) -> None:
        """A copy of a domain text encoder in the run (RUN/text-encoder), so that the run alone can
        sample; copied aside and renamed into place. Pretrained encoders are recorded by name."""
        import shutil

        from .clip import folder_files, info_file
        from .encoders import RUN_COPY, DomainTextEncoder

        copy = self.run_dir / RUN_COPY
        if not isinstance(self.text_encoder, DomainTextEncoder) or info_file(copy) is not None:
            return
        aside = self.run_dir / f".{RUN_COPY}.tmp"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for path in folder_files(self.text_encoder.source["path"]):  # not a text encoder run's checkpoint
            shutil.copy2(path, aside / path.name)
        shutil.rmtree(copy, ignore_errors=True)
        aside.rename(copy)

    def _restore(self, ckpt: Checkpoint) -> None:
        try:
            self.model.load_state_dict(ckpt.model)
            if ckpt.ema.keys() != self.ema.shadow.keys():
                raise KeyError("its EMA weights do not match the model's parameters")
            for name, value in ckpt.ema.items():
                if value.shape != self.ema.shadow[name].shape:
                    raise ValueError(
                        f"EMA tensor {name} has shape {tuple(value.shape)}, the model's "
                        f"{tuple(self.ema.shadow[name].shape)}"
                    )
            self.ema.shadow = {k: v.to(self.device) for k, v in ckpt.ema.items()}
            load_optimizer_state(self.optimizer, ckpt.optimizer, ckpt.optimizer_meta)
            stepped = len(self.optimizer.state)
            if ckpt.step > 0 and stepped != len(list(self.model.parameters())):
                raise ValueError(f"its optimiser state covers {stepped} of the model's parameters")
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not match this config: {e}") from None
        self.step = ckpt.step
        self.train_seconds = float(ckpt.train_state.get("train_seconds", 0.0))
        self.skipped_steps = int(ckpt.train_state.get("skipped_steps", 0))
        self.consecutive_skips = int(ckpt.train_state.get("consecutive_skips", 0))

    # ---- one training step (Algorithm 1) ----

    def batch(self, step: int, g: torch.Generator):
        """This process's share of step ``step``'s batch: (x0, t, noise, condition or None): class ids,
        caption rows, or a super-resolution stage's LowResImage. The randoms of the whole global batch are
        drawn (flips, t, noise, then condition dropout or augmentation levels and noise) and sliced, so
        they do not depend on the process count; an unconditional run draws exactly what it always did."""
        B = self.cfg.train.batch_size
        indices = None if self.streamed else self.order.indices(step)
        flip = None
        if self.is_image and self.cfg.data.random_flip:
            flip = torch.rand(B, generator=g) < 0.5
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g)
        noise = torch.randn((B, *self.noise_shape), generator=g)
        share = B // self.procs.world_size
        mine = slice(self.procs.rank * share, (self.procs.rank + 1) * share)
        if self.cfg.model.kind == "text-encoder":  # the images' caption rows travel in t's place
            t = self.caption_tokens.ids[indices]
        y = None
        if self.labels is not None:  # condition dropout: some examples train the null class (or text "")
            null = self.captions.null if self.captions is not None else self.cfg.model.num_classes
            drop = torch.rand(B, generator=g) < self.cfg.train.cond_dropout
            y = to_device(torch.where(drop, null, self.labels[indices])[mine], self.device)
        low_res = self.cfg.model.low_res
        if low_res:  # noise-conditioning augmentation: a random level per example
            level = torch.randint(0, self.cfg.model.low_res_noise_max, (B,), generator=g)[mine]
            augmentation = torch.randn((B, *self.example_shape), generator=g)[mine]
        if self.latents is not None:  # a latent drawn from each image's (or its mirror image's) posterior
            eps = to_device(torch.randn((B, *self.example_shape), generator=g)[mine], self.device)
            rows = to_device(indices[mine], self.device)
            side = to_device(flip[mine].long(), self.device) if flip is not None else torch.zeros_like(rows)
            mean, logvar = self.latents[0][side, rows], self.latents[1][side, rows]
            x = (mean + torch.exp(0.5 * logvar) * eps) * self.autoencoder.scale
            return x, to_device(t[mine], self.device), to_device(noise[mine], self.device), y
        if self.streamed:
            x = to_device(self.next_streamed_batch(step, share), self.device)
        else:
            x = self.data[to_device(indices[mine], self.device)]
        if self.is_image:
            low = to_model_range(downsample(x, low_res)) if low_res else None
            x = to_model_range(x)
            if flip is not None:
                flipped = to_device(flip[mine], self.device)[:, None, None, None]
                x = torch.where(flipped, x.flip(3), x)
                low = torch.where(flipped, low.flip(3), low) if low_res else None
            if low_res:
                alphas = self.diffusion.np["alphas_cumprod"]
                y = low_res_condition(low, x.shape[-1], level, to_device(augmentation, self.device), alphas)
        return x, to_device(t[mine], self.device), to_device(noise[mine], self.device), y

    def next_streamed_batch(self, step: int, share: int) -> torch.Tensor:
        """This process's next ``share`` images from the shards; the stream opens where step ``step``
        starts (a resumed run skips what it had read)."""
        if self.stream is None:
            from .shards import stream_batches

            d = self.cfg.data
            _, self.stream = stream_batches(
                d.root,
                d.image_size,
                self.example_shape[0],
                self.cfg.train.seed,
                share,
                self.procs.rank,
                self.procs.world_size,
                d.loader_workers,
                start_batch=step,  # one batch of `share` images per process and step
            )
        try:
            return next(self.stream)
        except DataError as e:  # from a loader worker: its message ends with the original one line
            raise DataError(str(e).strip().splitlines()[-1].removeprefix("ddpm.errors.DataError: ")) from None

    def train_step(self) -> dict[str, float | torch.Tensor]:
        t_cfg = self.cfg.train
        g = step_generator(t_cfg.seed, self.step)
        x0, t, noise, y = self.batch(self.step, g)
        seed_dropout(t_cfg.seed, self.step, self.procs.rank)

        lr = learning_rate(self.step, t_cfg.lr, t_cfg.warmup_steps, t_cfg.lr_schedule, t_cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        (self.ddp or self.model).train()
        accum = t_cfg.grad_accum
        loss = torch.zeros((), device=self.device)
        ys = y.chunk(accum) if y is not None else [None] * accum
        micro_batches = zip(x0.chunk(accum), t.chunk(accum), noise.chunk(accum), ys, strict=True)
        for i, (x_i, t_i, noise_i, y_i) in enumerate(micro_batches):
            network = self.network
            if y_i is not None:  # class ids, or rows of the caption cache
                cond = y_i if self.captions is None else self.captions.rows(y_i)
                network = functools.partial(_with_condition, self.network, cond)
            # Gradients are exchanged once per step, with the last micro-batch's backward pass.
            last = i == accum - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                micro = self.objective.training_losses(network, x_i, t_i, noise_i)["loss"].mean()
                if i == 0:
                    # Freed after the forward pass, not before: the backward pass then gets the old
                    # gradients' memory back (freed before the forward, a step ran ~5% slower here).
                    self.optimizer.zero_grad(set_to_none=True)
                if accum == 1:
                    micro.backward()
                    loss = micro.detach()
                else:
                    (micro / accum).backward()
                    loss = loss + micro.detach() / accum
        loss = self.procs.mean(loss)
        limit = t_cfg.grad_clip or math.inf  # 0: measured, not clipped
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if t_cfg.deferred_checks:
            return self._update_unchecked(loss, grad_norm, lr)
        stats = {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}
        if math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]):
            self.optimizer.step()
            self.ema.update(self.model)
            self.consecutive_skips = 0
        else:  # never let a NaN or an infinity into the weights, the EMA or a checkpoint
            self._skip_or_stop(self.step + 1, stats["loss"], stats["grad_norm"])
            stats["skipped"] = 1.0
        self.step += 1
        return stats

    def _update_unchecked(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict:
        """train.deferred_checks: the update without reading anything back. A non-finite step is
        skipped on the device (fused Adam leaves weights, moments and step count alone when found_inf is
        1, and the EMA moves by 0); ``check_deferred`` reads the steps back later. The stats are
        device tensors."""
        bad = (~(loss.isfinite() & grad_norm.isfinite())).float()
        self.optimizer.found_inf = bad
        self.optimizer.step()
        self.ema.update(self.model, weight=(1.0 - self.ema.decay) * (1.0 - bad))
        self.unchecked.append((self.step + 1, loss, grad_norm))
        self.step += 1
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    def check_deferred(self) -> int:
        """train.deferred_checks: read the unchecked steps back (one synchronisation) and apply
        train.on_nonfinite to each in order, as the per-step check would have; returns how many were
        skipped."""
        if not self.unchecked:
            return 0
        steps = [step for step, _, _ in self.unchecked]
        values = torch.stack([torch.stack([loss, norm]) for _, loss, norm in self.unchecked]).tolist()
        self.unchecked = []
        skipped = 0
        for step, (loss, grad_norm) in zip(steps, values, strict=True):
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self.consecutive_skips = 0
            else:
                self._skip_or_stop(step, loss, grad_norm, found_at=self.step)
                skipped += 1
        return skipped

    def _skip_or_stop(self, step: int, loss: float, grad_norm: float, found_at: int | None = None) -> None:
        """Step ``step`` (1-based) had a non-finite loss or gradient norm and its update was not
        applied: count it as skipped, or stop (train.on_nonfinite, or too many skips in a row)."""
        if self.cfg.train.on_nonfinite == "stop" or self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS - 1:
            found = (
                f", found at step {found_at} (train.deferred_checks)" if found_at not in (None, step) else ""
            )
            raise FloatingPointError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}{found}; that "
                "update was not applied (no NaN reached the weights)"
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1

    # ---- the loop ----

    def train(self) -> dict:
        """Train up to train.steps, or until the time limit or a SIGINT / SIGTERM, checkpointing on the
        way and at the end. Returns the step reached and why it stopped."""
        if self.procs.is_main:
            self.run.lock()
        try:
            return self._train()
        finally:
            self.run.unlock()

    def _train(self) -> dict:
        t_cfg = self.cfg.train
        if self.step >= t_cfg.steps:
            # A run killed between its last checkpoint and its final grid gets the grid now.
            if self.procs.any(self.procs.is_main and not self.sample_path(self.step).is_file())[0]:
                self.write_samples()
            return {"step": self.step, "stopped": "done"}
        # The limit is for this call: a run stopped by it and resumed gets the full limit again.
        limit = None if t_cfg.time_limit_minutes is None else t_cfg.time_limit_minutes * 60
        session_seconds = 0.0
        bar = _progress(self.progress, self.step, t_cfg.steps)
        metrics_file = open(self.run.metrics_path, "a") if self.procs.is_main else None
        stopped = "done"
        window_start, window_images = time.perf_counter(), 0
        handlers = _catch_stop_signals(self)
        try:
            while self.step < t_cfg.steps:
                start = time.perf_counter()
                stats = self.train_step()
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                session_seconds += elapsed
                window_images += t_cfg.batch_size
                bar.update(1)
                # Every process must stop at the same step: the time limit and signals are agreed on.
                sigint, sigterm, out_of_time = self.procs.any(
                    self.stop_signal == signal.SIGINT,
                    self.stop_signal == signal.SIGTERM,
                    limit is not None and session_seconds >= limit,
                )
                signalled = sigint or sigterm
                last = signalled or out_of_time or self.step == t_cfg.steps
                log = self.step % t_cfg.log_every == 0 or self.step == t_cfg.steps or "skipped" in stats
                checkpoint = self.step % t_cfg.checkpoint_every == 0 or last
                if t_cfg.deferred_checks and (log or checkpoint):  # (on every process: they agree)
                    start = time.perf_counter()
                    stats = {name: float(value) for name, value in stats.items()}
                    skipped = self.check_deferred()
                    waited = time.perf_counter() - start  # for the device to finish the unchecked steps
                    self.train_seconds += waited
                    session_seconds += waited
                    if skipped:
                        stats["skipped"], log = float(skipped), True
                if log:
                    elapsed = time.perf_counter() - window_start
                    stats["images_per_s"] = round(window_images / max(elapsed, 1e-9), 2)
                    window_start, window_images = time.perf_counter(), 0
                    if metrics_file is not None:
                        record = {"step": self.step, **{k: float(f"{v:.6g}") for k, v in stats.items()}}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                if self.procs.is_main and checkpoint:
                    self.save()
                if self.step % t_cfg.sample_every == 0 or (last and not signalled):
                    self.write_samples()  # every process draws its share of the grid's batches
                if signalled:
                    stopped = "SIGINT" if sigint else "SIGTERM"
                    break
                if out_of_time:
                    stopped = "time limit"
                    break
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if metrics_file is not None:
                metrics_file.close()
            bar.close()
        result = {"step": self.step, "stopped": stopped, "train_seconds": round(self.train_seconds, 1)}
        if self.skipped_steps:
            result["skipped_steps"] = self.skipped_steps
        return result

    def save(self) -> None:
        self.check_deferred()  # (the skip count it records must be up to date)
        state = {"step": self.step, "seed": self.cfg.train.seed, "train_seconds": self.train_seconds}
        if self.skipped_steps:
            state["skipped_steps"] = self.skipped_steps
            state["consecutive_skips"] = self.consecutive_skips
        if self.procs.distributed:
            state["world_size"] = self.procs.world_size
        if self.cfg.model.kind == "autoencoder":  # recorded with the weights: what latent diffusion scales by
            from .latent import LATENT_SCALE_SAMPLES, measure_scale

            images = to_model_range(self.data[:LATENT_SCALE_SAMPLES])
            ema_model = self.ema.model_copy(self.model)
            state["latent_scale"] = measure_scale(
                ema_model, images, sampling_generator(self.cfg.train.seed, 0)
            )
        save_checkpoint(
            self.run_dir / CHECKPOINT_NAME,
            self.cfg.to_dict(),
            self.model.state_dict(),
            self.ema.shadow,
            self.optimizer,
            state,
        )

    def low_res_examples(self, n: int):
        """A super-resolution stage's conditions for its grids: the first ``n`` training images (or of the
        stream), downsampled and noised to the sampling level with a fixed generator."""
        if self.streamed:
            from .shards import load_all_shards

            d = self.cfg.data
            images = load_all_shards(d.root, d.image_size, self.example_shape[0], limit=n)
        else:
            images = self.data[:n]
        images = images.to(self.device)
        if len(images) < n:
            images = images.repeat((n + len(images) - 1) // len(images), 1, 1, 1)[:n]
        alphas = self.diffusion.np["alphas_cumprod"]
        return conditions_for(images, self.cfg.model, images.shape[-1], alphas, self.cfg.train.seed)

    @torch.no_grad()
    def _write_reconstructions(self, ema_model) -> Path:
        """An autoencoder's grid: the first training images, each above its reconstruction from the
        posterior mean."""
        n = max(self.cfg.train.num_sample_images // 2, 1)
        images = to_model_range(self.data[:n])
        reconstructions = ema_model.decode(ema_model.encode(images)[0]).clamp(-1, 1)
        rows = max(int(n**0.5), 1)
        pairs = [
            part for i in range(0, n, rows) for part in (images[i : i + rows], reconstructions[i : i + rows])
        ]
        path = self.sample_path(self.step)
        path.parent.mkdir(exist_ok=True)
        save_grid(to_uint8(torch.cat(pairs)), path, nrow=rows)
        return path

    def sample_path(self, step: int) -> Path:
        return self.run_dir / "samples" / f"step_{step:07d}.png"

    def write_samples(self) -> Path | None:
        """A grid (or scatter plot) of samples from the EMA model, with a fixed seed; class-conditional
        runs get one row per class (plain conditional samples, w = 0). Under torchrun every process
        draws its share and rank 0 writes (the others return None)."""
        t_cfg = self.cfg.train
        if self.cfg.model.kind == "text-encoder":  # nothing to draw: its zero-shot accuracy is its report
            return None
        ema_model = self.ema.model_copy(self.model)
        if self.cfg.model.kind == "autoencoder":
            return self._write_reconstructions(ema_model) if self.procs.is_main else None
        shape = self.example_shape
        num_classes = self.cfg.model.num_classes
        labels = cond = None
        if self.captions is not None:  # a row per prompt: one per class where the data has classes
            prompts = grid_prompts(self.cfg, self.captions.texts)
            labels = balanced_classes(t_cfg.num_sample_images, len(prompts))
            cond = self.text_encoder.encode(prompts)[labels]
        elif num_classes:
            labels = cond = balanced_classes(t_cfg.num_sample_images, num_classes)
        elif self.cfg.model.low_res:  # the first training images, downsampled (a fixed set)
            cond = self.low_res_examples(t_cfg.num_sample_images)
        samples = generate(
            ema_model,
            self.diffusion,
            t_cfg.num_sample_images,
            shape,
            batch_size=256,
            seed=t_cfg.seed,
            steps=t_cfg.sample_steps,
            device=self.device,
            # 2-D points and latents are not bounded to [-1, 1]
            clip_denoised=self.is_image and self.latents is None,
            precision=t_cfg.precision,
            procs=self.procs,
            cond=cond,
        )
        if samples is None:
            return None
        if self.latents is not None:
            from .latent import decode_latents

            samples = decode_latents(self.autoencoder, samples, self.device)
        path = self.sample_path(self.step)
        path.parent.mkdir(exist_ok=True)
        if self.is_image and labels is not None:
            save_class_grid(to_uint8(samples), labels, path)
        elif self.is_image:
            save_grid(to_uint8(samples), path)
        else:
            plot_points(samples, path, reference=self.dataset.data[:2000].cpu())
        return path


def _with_condition(network, cond, x, t):
    return network(x, t, cond)


def _catch_stop_signals(trainer: Trainer) -> dict:
    """Turn the first SIGINT / SIGTERM into a request to stop after the current step (with a
    checkpoint); a second one acts as usual. Returns the handlers to put back."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_stop(signum, frame):
        trainer.stop_signal = signum
        signal.signal(signum, previous[signum])

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, request_stop)
    return previous


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs) -> None: ...

    def close(self) -> None: ...
