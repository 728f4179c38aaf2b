"""Training a domain text encoder: a CLIP-style pair (text tower, image tower) trained contrastively on
the images' captions; its finish exports the text tower as a folder inside the run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..clip import (
    DomainClip,
    TokenizedCaptions,
    clip_config,
    export_text_encoder,
    keep_tokenizer,
    run_tokenizer,
)
from ..config import Config
from ..images import to_model_range
from ..rng import to_device
from .base import Batch, TaskContext
from .source import Examples, flipped, flips, in_memory


class TextEncoderTask:
    def __init__(self, cfg: Config, context: TaskContext):
        in_memory(cfg, "a text encoder trains on data in memory")
        self.cfg, self.context = cfg, context
        self.examples = Examples(cfg, context)
        cfg.data.channels = cfg.data.channels or self.examples.shape[0]
        self.example_shape = self.examples.shape
        captions = self.examples.dataset.captions
        self.tokenizer = run_tokenizer(cfg, captions, context.run_dir)
        self.captions = TokenizedCaptions(self.tokenizer, captions).to(context.device)

    def build_network(self) -> nn.Module:
        return DomainClip(clip_config(self.cfg, self.example_shape[0]), self.tokenizer)

    def keep_parts(self) -> None:
        keep_tokenizer(self.tokenizer, self.context.run_dir)

    def batch(self, step: int, g: torch.Generator) -> Batch:
        """The images (flipped as drawn) and their caption rows."""
        B = self.cfg.train.batch_size
        flip = flips(self.examples, B, g)
        indices, mine = self.examples.indices(step), self.context.share(B)
        x = to_model_range(self.examples.take(step, indices, mine))
        rows = to_device(self.captions.ids[indices][mine], self.context.device)
        return Batch(flipped(x, flip, mine), cond=rows)

    def loss(self, network, batch: Batch) -> torch.Tensor:
        return network(batch.x, self.captions.batch(batch.cond))

    def preview(self, ema_model, path: Path) -> None:
        return None  # nothing to draw: its zero-shot accuracy (at the finish) is its report

    def checkpoint_state(self, ema_model) -> dict:
        return {}

    def finish(self) -> dict:
        """The text tower exported as a folder inside the run, with its zero-shot accuracy."""
        info = export_text_encoder(self.context.run_dir, self.context.device)
        return {k: v for k, v in info.items() if k not in ("format", "class_names", "steps")}
