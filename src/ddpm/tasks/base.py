"""The protocol between the training loop and what it trains.

The Trainer runs the loop (optimiser, EMA, checkpoints, signals, time limit, processes); a task is what
differs per kind of model: it opens the data, makes each step's batch from the step's generator,
computes the per-example loss, draws the preview grids, adds to the checkpoint's state and finishes the
run. Tasks see a narrow context (paths, device, processes), never the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import Config
from ..runtime import Processes


@dataclass(frozen=True)
class TaskContext:
    """What a task may know of the run it serves."""

    run_dir: Path
    device: torch.device
    procs: Processes
    cache_dir: str | Path | None = None  # for the evaluation a task's finish runs (inception, classifier)
    progress: bool = True

    def share(self, batch_size: int) -> slice:
        """This process's rows of a global batch: every process draws the whole batch's randoms from
        the step's generator and takes its slice, so results do not depend on the process count."""
        share = batch_size // self.procs.world_size
        return slice(self.procs.rank * share, (self.procs.rank + 1) * share)


@dataclass
class Batch:
    """This process's share of one step's examples. A task fills what its loss reads: images or latents
    ``x``, timesteps ``t``, noise, and a condition: a tensor of rows (class ids, caption rows) that the
    task turns into the network's condition, or a condition itself (a LowResImage). Every field splits
    the same way, with ``chunk`` (a tensor's, or a ``ddpm.conditioning.condition.Condition``'s)."""

    x: torch.Tensor
    t: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    cond: Any = None

    def chunk(self, n: int) -> list[Batch]:
        """``n`` micro-batches (gradient accumulation), split along the batch."""
        parts = [
            [None] * n if v is None else v.chunk(n) for v in (getattr(self, f.name) for f in fields(self))
        ]
        return [Batch(*values) for values in zip(*parts, strict=True)]


class Task(Protocol):
    cfg: Config  # the run's config, with what the task resolved from its data and parts
    example_shape: tuple[int, ...]  # one example as the network sees it

    def build_network(self) -> nn.Module:
        """The network to train, with fresh weights from the global generator (seeded by the Trainer)."""

    def keep_parts(self) -> None:
        """Copy into the run directory what the run needs later (a text encoder, an autoencoder, a
        tokenizer); called by the main process once it owns the directory."""

    def batch(self, step: int, generator: torch.Generator) -> Batch:
        """This process's share of step ``step``'s batch, every random drawn from ``generator``."""

    def loss(self, network, batch: Batch) -> torch.Tensor:
        """The per-example loss of ``network`` (the trained module, wrapped for precision) on a batch."""

    def preview(self, ema_model: Callable[[], nn.Module], path: Path) -> Path | None:
        """Draw the run's preview grid at ``path``; every process calls it (each draws its share of the
        samples) and the main process writes; ``ema_model()`` makes the EMA weights' model (a copy, made
        only by a task that draws). Returns the path written, or None."""

    def checkpoint_state(self, ema_model: Callable[[], nn.Module]) -> dict:
        """Values the checkpoint records beside the weights (an autoencoder's latent scale);
        ``ema_model()`` makes a model with the EMA weights (a copy: made only where needed)."""

    def finish(self) -> dict:
        """The main process's last work on a finished run (a report, an export); returns its record."""
