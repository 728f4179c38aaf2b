"""A run's training examples: a dataset in memory with its batch order, or shards streamed as training
goes. Shared by every task."""

from __future__ import annotations

import torch

from ..config import Config
from ..data import BatchOrder, Dataset, load_dataset
from ..errors import DataError
from ..rng import to_device
from ..shards import ShardIndex, load_all_shards, stream_batches
from .base import TaskContext


class Examples:
    """``shape`` is one example's ([C, H, W] images or [2] points); ``dataset`` is None when streamed."""

    def __init__(self, cfg: Config, context: TaskContext):
        self.cfg, self.context = cfg, context
        self.streamed = cfg.data.dataset == "shards"
        self.stream = None  # opened at the step training starts from
        if self.streamed and cfg.data.labels != "none":
            raise DataError("shards carry no class labels (yet); train on them with data.labels=none")
        if self.streamed:
            index = ShardIndex.load(cfg.data.root)
            index.check(context.procs.world_size * max(cfg.data.loader_workers, 1))
            channels = cfg.data.channels or index.channels
            self.dataset = None
            self.shape = (channels, cfg.data.image_size, cfg.data.image_size)
            self.is_image = True
        else:
            self.dataset: Dataset = load_dataset(cfg.data, seed=cfg.train.seed)
            self.shape = tuple(self.dataset.data.shape[1:])
            self.is_image = self.dataset.is_image
            self.order = BatchOrder(len(self.dataset), cfg.train.batch_size, cfg.train.seed)
            self.data = self.dataset.data.to(context.device)

    def indices(self, step: int) -> torch.Tensor | None:
        """The dataset rows of step ``step``'s global batch (None when streamed: the stream's order)."""
        return None if self.streamed else self.order.indices(step)

    def take(self, step: int, indices: torch.Tensor | None, mine: slice) -> torch.Tensor:
        """This process's examples of the step, on the device (uint8 images, or float points)."""
        if self.streamed:
            return to_device(self._next_streamed(step, mine.stop - mine.start), self.context.device)
        return self.data[to_device(indices[mine], self.context.device)]

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` examples (of the stream, too), on the device: the previews' fixed set."""
        if self.streamed:
            d = self.cfg.data
            return load_all_shards(d.root, d.image_size, self.shape[0], limit=n).to(self.context.device)
        return self.data[:n]

    def _next_streamed(self, step: int, share: int) -> torch.Tensor:
        """This process's next ``share`` images from the shards; the stream opens where step ``step``
        starts (a resumed run skips what it had read)."""
        if self.stream is None:
            d, procs = self.cfg.data, self.context.procs
            _, self.stream = stream_batches(
                d.root,
                d.image_size,
                self.shape[0],
                self.cfg.train.seed,
                share,
                procs.rank,
                procs.world_size,
                d.loader_workers,
                start_batch=step,  # one batch of `share` images per process and step
            )
        try:
            return next(self.stream)
        except DataError as e:  # from a loader worker: its message ends with the original one line
            raise DataError(str(e).strip().splitlines()[-1].removeprefix("ddpm.errors.DataError: ")) from None


def in_memory(cfg: Config, why: str) -> None:
    """Refuse shards for a task that needs its whole dataset in memory (``why`` says what it does)."""
    if cfg.data.dataset == "shards":
        raise DataError(f"{why}; it cannot stream shards (yet)")


def flips(examples: Examples, batch_size: int, generator: torch.Generator) -> torch.Tensor | None:
    """Which examples of a step's global batch are mirrored (data.random_flip), drawn first of all."""
    if examples.is_image and examples.cfg.data.random_flip:
        return torch.rand(batch_size, generator=generator) < 0.5
    return None


def flipped(x: torch.Tensor, flip: torch.Tensor | None, mine: slice) -> torch.Tensor:
    """``x`` (this process's share) with the drawn flips applied."""
    if flip is None:
        return x
    return torch.where(to_device(flip[mine], x.device)[:, None, None, None], x.flip(3), x)
