"""Training (Algorithm 1): Adam with linear warm-up, global-norm clipping, EMA, checkpoints and resume.

Every random choice of step s (batch order, flips, timesteps, noise, dropout) comes from generators
seeded by (seed, s). A run resumed from a checkpoint therefore continues exactly as if it had never
stopped: on CPU the final weights are bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .build import build_diffusion, build_model
from .checkpoint import CHECKPOINT_NAME, Checkpoint, load_optimizer_state, save_checkpoint
from .config import Config, validate
from .data import BatchOrder, Dataset, load_dataset
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError
from .files import write_json
from .images import plot_points, save_grid, to_model_range, to_uint8
from .rng import seed_dropout, step_generator
from .runtime import resolve_device, wrap_network
from .sample import generate


class EMA:
    """Exponential moving average of the parameters, starting from the initial weights (no warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value, 1.0 - self.decay)  # shadow = decay * shadow + (1 - decay) * value
            else:
                shadow.copy_(value)

    def model_copy(self, model: nn.Module) -> nn.Module:
        import copy

        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(self.shadow)
        return ema_model.eval()


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 over ``warmup_steps`` updates, then constant (the original code)."""
    return base_lr * min(step / warmup_steps, 1.0) if warmup_steps > 0 else base_lr


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
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.num_sample_images",
    "train.sample_steps",
}


def check_resume_changes(saved: dict, cfg: Config) -> None:
    new = cfg.to_dict()
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
    """Owns one run directory: config.json, checkpoint.safetensors, metrics.jsonl, samples/."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True):
        validate(cfg)
        self.run_dir = Path(run_dir)
        self.progress = progress
        ckpt = None
        if resume:
            ckpt = Checkpoint(self.run_dir / CHECKPOINT_NAME)
            if cfg.data.channels is None:  # "the data's own", which the run already resolved
                cfg.data.channels = ckpt.config.get("data", {}).get("channels")
            check_resume_changes(ckpt.config, cfg)
        elif (self.run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{self.run_dir} already holds a run; use --resume to continue it or pick --out"
            )
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.dataset: Dataset = load_dataset(cfg.data, seed=cfg.train.seed)
        if cfg.data.channels is None:
            cfg.data.channels = self.dataset.channels
        torch.manual_seed(cfg.train.seed)  # the initial weights
        self.model = build_model(cfg, self.dataset.channels).to(self.device)
        # The network as the maths calls it: with the precision and speed options of the config.
        t = cfg.train
        self.network = wrap_network(self.model, self.device, t.precision, t.channels_last, t.compile)
        self.diffusion: GaussianDiffusion = build_diffusion(cfg)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.ema = EMA(self.model, t.ema_decay)
        self.step = 0
        self.train_seconds = 0.0
        self.order = BatchOrder(len(self.dataset), t.batch_size, t.seed)
        self.data = self.dataset.data.to(self.device)
        if ckpt is not None:
            self._restore(ckpt)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", cfg.to_dict())

    def _restore(self, ckpt: Checkpoint) -> None:
        try:
            self.model.load_state_dict(ckpt.model)
            if ckpt.ema.keys() != self.ema.shadow.keys():
                raise KeyError("its EMA weights do not match the model's parameters")
            self.ema.shadow = {k: v.to(self.device) for k, v in ckpt.ema.items()}
            load_optimizer_state(self.optimizer, ckpt.optimizer, ckpt.optimizer_meta)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not match this config: {e}") from None
        self.step = int(ckpt.train_state["step"])
        self.train_seconds = float(ckpt.train_state.get("train_seconds", 0.0))

    # ---- one training step (Algorithm 1) ----

    def batch(self, step: int, g: torch.Generator) -> torch.Tensor:
        x = self.data[self.order.indices(step).to(self.device)]
        if not self.dataset.is_image:
            return x
        x = to_model_range(x)
        if self.cfg.data.random_flip:
            flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def train_step(self) -> dict[str, float]:
        t_cfg = self.cfg.train
        g = step_generator(t_cfg.seed, self.step)
        x0 = self.batch(self.step, g)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        seed_dropout(t_cfg.seed, self.step)

        lr = learning_rate(self.step, t_cfg.lr, t_cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses = self.diffusion.training_losses(self.network, x0, t, noise)
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t_cfg.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}

    # ---- the loop ----

    def train(self) -> dict:
        t_cfg = self.cfg.train
        if self.step >= t_cfg.steps:
            return {"step": self.step, "stopped": "done"}
        # The limit is for this call: a run stopped by it and resumed gets the full limit again.
        limit = None if t_cfg.time_limit_minutes is None else t_cfg.time_limit_minutes * 60
        session_seconds = 0.0
        bar = _progress(self.progress, self.step, t_cfg.steps)
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        stopped = "done"
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < t_cfg.steps:
                start = time.perf_counter()
                stats = self.train_step()
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss became {stats['loss']} at step {self.step}")
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                session_seconds += elapsed
                window_images += t_cfg.batch_size
                bar.update(1)
                if self.step % t_cfg.log_every == 0 or self.step == t_cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    stats["images_per_s"] = round(window_images / max(elapsed, 1e-9), 2)
                    window_start, window_images = time.perf_counter(), 0
                    record = {"step": self.step, **{k: float(f"{v:.6g}") for k, v in stats.items()}}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                out_of_time = limit is not None and session_seconds >= limit
                last = out_of_time or self.step == t_cfg.steps
                if self.step % t_cfg.checkpoint_every == 0 or last:
                    self.save()
                if self.step % t_cfg.sample_every == 0 or last:
                    self.write_samples()
                if out_of_time:
                    stopped = "time limit"
                    break
        finally:
            metrics_file.close()
            bar.close()
        return {"step": self.step, "stopped": stopped, "train_seconds": round(self.train_seconds, 1)}

    def save(self) -> None:
        state = {"step": self.step, "seed": self.cfg.train.seed, "train_seconds": self.train_seconds}
        save_checkpoint(
            self.run_dir / CHECKPOINT_NAME,
            self.cfg.to_dict(),
            self.model.state_dict(),
            self.ema.shadow,
            self.optimizer,
            state,
        )

    def write_samples(self) -> Path:
        """A grid (or scatter plot) of samples from the EMA model, with a fixed seed."""
        t_cfg = self.cfg.train
        ema_model = self.ema.model_copy(self.model)
        shape = tuple(self.dataset.data.shape[1:])
        samples = generate(
            ema_model,
            self.diffusion,
            t_cfg.num_sample_images,
            shape,
            batch_size=256,
            seed=t_cfg.seed,
            steps=t_cfg.sample_steps,
            device=self.device,
            clip_denoised=self.dataset.is_image,  # 2-D points are not bounded to [-1, 1]
            precision=t_cfg.precision,
        )
        (self.run_dir / "samples").mkdir(exist_ok=True)
        if self.dataset.is_image:
            path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
            save_grid(to_uint8(samples), path)
        else:
            path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
            plot_points(samples, path, reference=self.dataset.data[:2000].cpu())
        return path


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs) -> None: ...

    def close(self) -> None: ...
