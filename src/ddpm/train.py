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
import copy
import json
import math
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .budget import Budget
from .checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from .config import MAX_EMA_WIDTH, Config, validate
from .dashboard import Dashboard
from .errors import CheckpointError, ConfigError
from .files import write_json
from .rng import seed_dropout, step_generator
from .rundir import RunDirectory
from .runtime import Runtime, init_processes, probe_precision
from .tasks import Batch, Task, TaskContext, make_task

# With train.on_nonfinite = "skip", this many skipped steps in a row stop the run all the same.
MAX_CONSECUTIVE_SKIPS = 100


def power_ema_exponent(sigma_rel: float) -> float:
    """The exponent gamma of EDM2's power-function EMA profile (Karras et al. 2024, Section 3.1 and
    Appendix C.2) of relative width ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (their ``std_to_exp``), i.e.
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). For 0 < sigma_rel < 12^-0.5 that root is
    the only one above 0 (the relation decreases there from 12^-0.5 at gamma = 0) and below 1 / sigma_rel
    (sigma_rel < 1 / (gamma + 2)); it is found by bisection in plain floats, to the last bit and the same
    bits on every machine (an eigenvalue solver such as numpy.roots may differ in the last bits with the
    linear algebra library)."""
    if not 0 < sigma_rel < MAX_EMA_WIDTH:
        raise ValueError(f"a power-function EMA's width must be in (0, {MAX_EMA_WIDTH:.4f}), got {sigma_rel}")
    inv = sigma_rel**-2

    def cubic(g: float) -> float:
        return ((g + 7.0) * g + 16.0 - inv) * g + 12.0 - inv

    lo, hi = 0.0, 1.0 / sigma_rel  # cubic(lo) < 0 < cubic(hi)
    for _ in range(2200):  # (each halves the interval: the floats between them run out well before)
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cubic(mid) > 0:
            hi = mid
        else:
            lo = mid
    return lo if abs(cubic(lo)) <= abs(cubic(hi)) else hi


class EMA:
    """Moving average of the parameters, starting from the initial weights (no warm-up).

    With a constant ``decay`` (train.ema_decay, the paper's), the exponential one. With ``width``
    (train.ema_width, EDM2's sigma_rel), EDM2's power-function EMA in its place: the update after the
    t-th optimiser update (t = 1, 2, ...) has decay beta_t = (1 - 1/t)^(gamma + 1), gamma =
    ``power_ema_exponent(width)`` (EDM2's ``power_function_beta``; beta_1 = 0, so it starts as the weights
    after the first update). Since beta_{i+1} ... beta_t = (i/t)^(gamma + 1), the average after step t
    is sum_i (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1) * theta_i, theta_i the weights after step i:
    exactly the continuous profile (gamma+1) s^gamma / t^(gamma+1) over the weights held at theta_i on
    (i-1, i], and close to the i^gamma-weighted average. Its length is thus a share of the run's length,
    whatever that is. The step count comes from the caller (the Trainer's step, which a checkpoint
    keeps), so the shadow weights are all the state there is."""

    def __init__(self, model: nn.Module, decay: float, width: float | None = None):
        self.decay = decay
        self.width = width
        self.exponent = None if width is None else power_ema_exponent(width)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int | None) -> float:
        """The decay of the update that follows optimiser update ``step`` (1-based): ``decay``, or
        beta_step of the power-function profile."""
        if self.exponent is None:
            return self.decay
        if step is None or step < 1:
            raise ValueError(f"a power-function EMA needs the optimiser step (1, 2, ...), got {step}")
        return (1.0 - 1.0 / step) ** (self.exponent + 1.0)

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None, step: int | None = None) -> None:
        """One step towards ``model``'s weights, after optimiser update ``step`` (1-based; needed by the
        power-function profile only); ``weight``, a 0-dim device tensor in place of 1 - decay, lets a
        skipped step move it by 0 without reading anything back."""
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
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay_at(step))
        else:
            torch._foreach_lerp_(shadows, values, [weight] * len(shadows))

    def model_copy(self, model: nn.Module) -> nn.Module:
        ema_model = copy.deepcopy(model)
        ema_model.load_state_dict(self.shadow)
        return ema_model.eval()


def learning_rate(
    step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", total_steps: int = 0
) -> float:
    """Linear warm-up from 0 over ``warmup_steps`` updates, then constant (the original code) or decaying
    to 0 at ``total_steps``: along a half cosine (``schedule="cosine"``) or a straight line ("linear"; with
    the warm-up, the one-cycle shape). ``total_steps`` 0 is a count not known yet (a budgeted run's probe,
    ddpm.budget): no decay."""
    lr = base_lr * min(step / warmup_steps, 1.0) if warmup_steps > 0 else base_lr
    if schedule == "cosine" and total_steps:
        lr *= 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    elif schedule == "linear" and total_steps:
        lr *= max(1.0 - step / total_steps, 0.0)
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
    "train.tensorboard",
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


def restore_resolved(cfg: Config, ckpt: Checkpoint) -> None:
    """Put back into a resumed run's config what the run resolved from its data and parts (the data's
    channels, the classes, a text encoder's width, the latent shape), wherever the caller asks for what
    the run was asked for."""
    if not ckpt.resolved and ckpt.request == ckpt.config:  # recorded before the request was
        _restore_open_values(cfg, ckpt.config)
        return
    asked = json.loads(json.dumps(cfg.to_dict()))
    for key, value in ckpt.resolved.items():
        section, field = key.split(".", 1)
        if asked.get(section, {}).get(field) == ckpt.request.get(section, {}).get(field):
            setattr(getattr(cfg, section), field, tuple(value) if isinstance(value, list) else value)


def _restore_open_values(cfg: Config, saved: dict) -> None:
    """A checkpoint without its request: the values the caller may have left open."""
    if cfg.data.channels is None:
        cfg.data.channels = saved.get("data", {}).get("channels")
    if cfg.data.labels == "classes" and not cfg.model.num_classes:
        cfg.model.num_classes = saved.get("model", {}).get("num_classes", 0)
        cfg.data.class_names = tuple(saved.get("data", {}).get("class_names", ()))
    if cfg.model.text_encoder and not cfg.model.context_dim:  # (a text encoder run has no width to take)
        cfg.model.context_dim = saved.get("model", {}).get("context_dim", 0)
        cfg.model.pooled_dim = saved.get("model", {}).get("pooled_dim", 0)
        cfg.data.class_names = tuple(saved.get("data", {}).get("class_names", ()))


class Trainer:
    """Owns one run directory: config.json, checkpoint.safetensors, metrics.jsonl, samples/.

    What differs per kind of model (its data, batches, loss, previews and finish) is the run's task
    (ddpm.tasks); the Trainer runs the loop. Under torchrun every process holds the model, the optimiser
    and the EMA (kept equal by DistributedDataParallel); only rank 0 touches the run directory."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        cache_dir: str | Path | None = None,
    ):
        validate(cfg)
        request = cfg.to_dict()  # as asked for; what the task resolves from the data goes into a copy
        cfg = copy.deepcopy(cfg)
        self.run = RunDirectory(run_dir)
        self.run_dir = self.run.path
        t = cfg.train
        probing = t.precision == "auto"  # (chosen below, once the network and a batch exist)
        precision = "fp32" if probing else t.precision
        self.runtime = Runtime(t.device, precision, t.channels_last, t.compile, t.compile_mode).resolve()
        self.device = self.runtime.device
        self.procs = init_processes(self.device)
        self.progress = progress and self.procs.is_main
        share = t.batch_size // self.procs.world_size
        if t.batch_size % self.procs.world_size or share % t.grad_accum:
            raise ConfigError(
                f"train.batch_size {t.batch_size} must split evenly over {self.procs.world_size} process(es) "
                f"and train.grad_accum={t.grad_accum} micro-batches each"
            )
        ckpt = None
        if resume:
            ckpt = Checkpoint(self.run_dir / CHECKPOINT_NAME)
            restore_resolved(cfg, ckpt)
        self.budget = Budget.of(t.budget_minutes, ckpt.train_state.get("budget") if ckpt else None)
        if self.budget is not None:  # its step count replaces train.steps (measured, or being measured)
            t.steps = self.budget.total_steps()
        if resume:
            check_resume_changes(ckpt.config, cfg)
        elif (self.run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(
                f"{self.run_dir} already holds a run; continue it with resume, or choose another run "
                "directory",
                field="resume",
            )
        self.cfg = cfg
        context = TaskContext(self.run_dir, self.device, self.procs, cache_dir, self.progress)
        self.task: Task = make_task(cfg, context)
        self.request = request  # recorded in the checkpoint beside the config the run resolved
        torch.manual_seed(cfg.train.seed)  # the initial weights
        self.model = self.task.build_network().to(self.device)
        if t.channels_last:  # before DistributedDataParallel registers the parameters' layout
            self.model.to(memory_format=torch.channels_last)
        self.ddp = None
        if self.procs.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
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
        self.ema = EMA(self.model, t.ema_decay, t.ema_width)
        self.kept_emas = [EMA(self.model, t.ema_decay, width) for width in t.ema_widths]
        self.step = 0
        self.train_seconds = 0.0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.unchecked = []  # train.deferred_checks: (step, loss, grad norm) not yet read back
        if ckpt is not None:
            self._restore(ckpt)
        self.batches: dict[int, Batch] = {}  # a step's batch made before its step (the precision probe's)
        self.precision_probe = self._choose_precision(cfg) if t.precision == "auto" else None
        # The network as the loss calls it: with the precision and speed options of the config.
        self.network = self.runtime.wrap(self.ddp or self.model)
        self.stop_signal: int | None = None
        self.clock = time.perf_counter  # what the loop times its steps with (a test's own clock in tests)
        problem = None
        if self.procs.is_main:
            # Owned from here on (checked last, so that bad input leaves no directory behind).
            try:
                self.run.lock()
                if not resume and (self.run_dir / CHECKPOINT_NAME).exists():  # written while we got ready
                    raise ConfigError(
                        f"{self.run_dir} already holds a run; continue it with resume", field="resume"
                    )
                self.run.remove_temporary_files()
                self.run.keep_metrics_up_to(self.step)
                write_json(self.run_dir / "config.json", cfg.to_dict())
                self.task.keep_parts()
            except (ConfigError, OSError) as e:
                self.run.unlock()
                problem = e
        if self.procs.any(problem is not None)[0]:  # under torchrun, the others stop with rank 0
            raise problem or ConfigError(f"rank 0 could not take {self.run_dir} (its error says why)")

    def _restore(self, ckpt: Checkpoint) -> None:
        try:
            self.model.load_state_dict(ckpt.model)
            kept = [ckpt.kept_emas.get(ema.width, {}) for ema in self.kept_emas]
            for ema, saved in zip((self.ema, *self.kept_emas), (ckpt.ema, *kept), strict=True):
                if saved.keys() != ema.shadow.keys():
                    raise KeyError("its EMA weights do not match the model's parameters")
                for name, value in saved.items():
                    if value.shape != ema.shadow[name].shape:
                        raise ValueError(
                            f"EMA tensor {name} has shape {tuple(value.shape)}, the model's "
                            f"{tuple(ema.shadow[name].shape)}"
                        )
                ema.shadow = {k: v.to(self.device) for k, v in saved.items()}
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

    def _choose_precision(self, cfg: Config) -> dict:
        """train.precision "auto": time this run's own first training step (forward and backward of its
        first micro-batch) in fp32 and bf16 (``ddpm.runtime.probe_precision``) and train in the faster,
        recorded as the config's resolved train.precision (so a resumed run keeps it). The probe's
        gradients are dropped and the batch is kept for the step (a stream is read once), so the run is
        the one it would be with that precision asked for. Every process must find bf16 faster for it."""
        t = cfg.train
        batch = self.task.batch(self.step, step_generator(t.seed, self.step))
        self.batches[self.step] = batch
        micro = batch.chunk(t.grad_accum)[0]

        def step(precision: str) -> None:
            network = replace(self.runtime, precision=precision, compile=False).wrap(self.ddp or self.model)
            self.task.loss(network, micro).mean().backward()
            self.model.zero_grad(set_to_none=True)

        probe = probe_precision(step, self.device)
        probe["chose"] = "fp32" if self.procs.any(probe["chose"] != "bf16")[0] else "bf16"
        t.precision = probe["chose"]
        self.runtime = replace(self.runtime, precision=t.precision)
        return probe

    # ---- one training step (Algorithm 1) ----

    def train_step(self) -> dict[str, float | torch.Tensor]:
        t_cfg = self.cfg.train
        batch = self.batches.pop(self.step, None)
        if batch is None:
            batch = self.task.batch(self.step, step_generator(t_cfg.seed, self.step))
        seed_dropout(t_cfg.seed, self.step, self.procs.rank)
        total = t_cfg.steps if self.budget is None or self.budget.fixed else 0
        lr = learning_rate(self.step, t_cfg.lr, t_cfg.warmup_steps, t_cfg.lr_schedule, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        (self.ddp or self.model).train()
        accum = t_cfg.grad_accum
        loss = torch.zeros((), device=self.device)
        for i, micro_batch in enumerate(batch.chunk(accum)):
            # Gradients are exchanged once per step, with the last micro-batch's backward pass.
            last = i == accum - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                micro = self.task.loss(self.network, micro_batch).mean()
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
            for ema in (self.ema, *self.kept_emas):
                ema.update(self.model, step=self.step + 1)
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
        for ema in (self.ema, *self.kept_emas):
            ema.update(self.model, weight=(1.0 - ema.decay_at(self.step + 1)) * (1.0 - bad))
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
        way and at the end; a run that got to its end (or its time limit) is then finished by its task
        (an autoencoder's reconstruction report, a text encoder's export). Returns the step reached, why
        it stopped and what the finish reported."""
        if self.procs.is_main:
            self.run.lock()
        try:
            result = self._train()
            if self.procs.is_main and result["stopped"] in ("done", "time limit"):
                result.update(self.task.finish())
            return result
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
        dashboard = Dashboard(self.run_dir, self.step, enabled=self.procs.is_main and t_cfg.tensorboard)
        stopped = "done"
        window_start, window_images = self.clock(), 0
        handlers = _catch_stop_signals(self)
        try:
            while self.step < t_cfg.steps:
                start = self.clock()
                stats = self.train_step()
                elapsed = self.clock() - start
                self.train_seconds += elapsed
                session_seconds += elapsed
                window_images += t_cfg.batch_size
                if self.budget is not None:  # (every process fixes the same count: the slowest's)
                    fixed = self.budget.observe(
                        self.step - 1, elapsed, self.train_seconds, self.procs.largest
                    )
                    if fixed is not None:
                        t_cfg.steps = bar.total = fixed
                        if fixed < t_cfg.warmup_steps and self.procs.is_main:
                            from tqdm.auto import tqdm  # (its write keeps a progress bar intact)

                            tqdm.write(
                                f"ddpm: the budget holds {fixed} steps, fewer than train.warmup_steps "
                                f"({t_cfg.warmup_steps}): the learning rate peaks at "
                                f"{fixed / t_cfg.warmup_steps:.0%} of train.lr",
                                file=sys.stderr,
                            )
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
                    start = self.clock()
                    stats = {name: float(value) for name, value in stats.items()}
                    skipped = self.check_deferred()
                    waited = self.clock() - start  # for the device to finish the unchecked steps
                    self.train_seconds += waited
                    session_seconds += waited
                    if skipped:
                        stats["skipped"], log = float(skipped), True
                if log:
                    elapsed = self.clock() - window_start
                    stats["images_per_s"] = round(window_images / max(elapsed, 1e-9), 2)
                    window_start, window_images = self.clock(), 0
                    if metrics_file is not None:
                        record = {"step": self.step, **{k: float(f"{v:.6g}") for k, v in stats.items()}}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        dashboard.scalars(self.step, {k: v for k, v in record.items() if k != "step"})
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_s']:.0f}")
                if self.procs.is_main and checkpoint:
                    self.save()
                if self.step % t_cfg.sample_every == 0 or (last and not signalled):
                    # every process draws its share of the grid's batches; the main one writes it
                    dashboard.image(self.step, self.write_samples())
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
            dashboard.close()
            bar.close()
        result = {"step": self.step, "stopped": stopped, "train_seconds": round(self.train_seconds, 1)}
        if self.budget is not None:
            result["budget"] = self.budget.record()
        if self.precision_probe is not None:
            result["precision_probe"] = self.precision_probe
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
        if self.budget is not None:
            state["budget"] = self.budget.record()
        if self.precision_probe is not None:
            state["precision_probe"] = self.precision_probe
        state.update(self.task.checkpoint_state(lambda: self.ema.model_copy(self.model)))
        save_checkpoint(
            self.run_dir / CHECKPOINT_NAME,
            self.cfg.to_dict(),
            self.model.state_dict(),
            self.ema.shadow,
            self.optimizer,
            state,
            self.request,
            [ema.shadow for ema in self.kept_emas],
        )

    def sample_path(self, step: int) -> Path:
        return self.run_dir / "samples" / f"step_{step:07d}.png"

    def write_samples(self) -> Path | None:
        """The task's preview of the EMA model at this step (a grid of samples with a fixed seed, an
        autoencoder's reconstructions). Under torchrun every process draws its share and rank 0 writes
        (the others return None)."""
        return self.task.preview(lambda: self.ema.model_copy(self.model), self.sample_path(self.step))


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
