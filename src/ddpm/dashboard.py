"""A run's TensorBoard event files (RUN/tensorboard/), beside metrics.jsonl, which stays the record.

Written where the `tensorboard` package is installed (the `tensorboard` extra) and train.tensorboard is on:
the logged training numbers (loss, learning rate, gradient norm, images/s, skipped steps), the preview
grids, and the evaluations `ddpm eval fid` makes of the run. Writing them draws from no random stream and
changes no result. A resumed run hides the events logged after its checkpoint (TensorBoard's purge step),
as metrics.jsonl drops its rows, so a run killed after logging shows each step once.

    tensorboard --logdir runs/
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TENSORBOARD_DIR = "tensorboard"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class Dashboard:
    """The event writer of one run directory, or nothing (every method a no-op) where it is off."""

    def __init__(self, run_dir: str | Path, resumed_from: int | None = None, enabled: bool = True):
        """``resumed_from``: the checkpoint's step when training resumes (or starts: 0), whose later
        events are hidden; None to add to the run's events (an evaluation)."""
        self.writer = None
        if enabled and available():
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_from is None else resumed_from + 1
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float], section: str = "train") -> None:
        for name, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(f"{section}/{name}", value, step)
        self.flush()

    def image(self, step: int, png: Path | None, name: str = "samples") -> None:
        """A preview grid (a PNG the run wrote) as the image of ``step``."""
        if self.writer is not None and png is not None and png.is_file():
            from PIL import Image

            with Image.open(png) as grid:
                pixels = np.asarray(grid.convert("RGB"))
            self.writer.add_image(name, pixels, step, dataformats="HWC")
            self.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
