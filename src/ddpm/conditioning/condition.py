"""What every kind of condition a network takes answers, so that batching, guidance and the networks never
ask which kind a condition is: class ids (``ClassIds``), text encodings and token ids
(``ddpm.text.TextEncoding`` / ``TokenIds``) and a super-resolution stage's low-resolution images
(``ddpm.conditioning.low_res.LowResImage``). A condition is a batch of B rows: it moves to a device,
gives rows (a slice or an index tensor), repeats one row for n examples, concatenates with others of
its kind and splits into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Condition(Protocol):
    """A batch of conditions, one row per example."""

    def to(self, device) -> Condition:
        """The same rows on ``device``."""

    def __len__(self) -> int:
        """The number of rows (examples)."""

    def __getitem__(self, rows) -> Condition:
        """The rows ``rows`` (a slice or an index tensor), as a condition of the same kind."""

    def repeat_to(self, n: int) -> Condition:
        """One row (a batch of 1) for ``n`` examples; a batch of ``n`` as it is; else a ValueError."""

    @staticmethod
    def cat(items: list) -> Condition:
        """One batch of several of the same kind, in order."""

    def chunk(self, n: int) -> list[Condition]:
        """``n`` consecutive parts (micro-batches), split as ``torch.Tensor.chunk`` splits."""


@dataclass
class ClassIds:
    """Class ids ``ids`` [B] (int64) in 0..K, where id K is a class-conditional network's null class.
    It only wraps the tensor: nothing is copied."""

    ids: torch.Tensor

    @staticmethod
    def of(ids) -> ClassIds:
        """Class ids from an int (one id, a batch of 1), a 0-d or [B] tensor, or anything
        ``torch.as_tensor`` takes; a tensor is wrapped, not copied."""
        ids = torch.as_tensor(ids)
        return ClassIds(ids.reshape(1) if ids.ndim == 0 else ids)

    def to(self, device) -> ClassIds:
        return ClassIds(self.ids.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> ClassIds:
        return ClassIds(self.ids[rows])

    def repeat_to(self, n: int) -> ClassIds:
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} class ids for a batch of {n}")
        return ClassIds(self.ids.expand(n))

    @staticmethod
    def cat(items: list[ClassIds]) -> ClassIds:
        return ClassIds(torch.cat([i.ids for i in items]))

    def chunk(self, n: int) -> list[ClassIds]:
        return [ClassIds(part) for part in self.ids.chunk(n)]


def as_condition(c) -> Condition:
    """``c`` as a condition: a condition as it is; anything else (an int class id, a tensor of class ids,
    one as a 0-d tensor) as ``ClassIds``, which is how callers gave class ids before there was a type."""
    return c if isinstance(c, Condition) else ClassIds.of(c)
