"""What differs per kind of model in training, behind one protocol (``Task``): the diffusion task
(pixels, latents, super-resolution, classes, captions), the autoencoder's and the text encoder's."""

from __future__ import annotations

from ..config import Config
from .autoencoder import AutoencoderTask
from .base import Batch, Task, TaskContext
from .diffusion import DiffusionTask
from .text_encoder import TextEncoderTask

TASKS = {"autoencoder": AutoencoderTask, "text-encoder": TextEncoderTask}


def make_task(cfg: Config, context: TaskContext) -> Task:
    """The task that trains ``cfg.model.kind``; it opens the data and writes what it resolves from the
    data and its parts (channels, classes, context width, latent shape) into ``cfg``."""
    return TASKS.get(cfg.model.kind, DiffusionTask)(cfg, context)


__all__ = ["Batch", "Task", "TaskContext", "make_task"]
