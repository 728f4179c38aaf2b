"""Writing samples: image grids, single PNGs, the uint8 .npz that FID tools read, 2-D scatter plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write


def to_hwc_uint8(images_uint8: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] uint8 -> [N, H, W, C] numpy (the layout of FID tools and PIL)."""
    return images_uint8.permute(0, 2, 3, 1).cpu().numpy()


def _pil(image_hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc)


def make_grid(images_uint8: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile [N, C, H, W] uint8 images into one [H', W', C] array, ``nrow`` images per row."""
    n, c, h, w = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(to_hwc_uint8(images_uint8)):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    grid = _pil(make_grid(images_uint8, nrow))
    atomic_write(Path(path), lambda tmp: grid.save(tmp, format="PNG"))


def save_pngs(images_uint8: torch.Tensor, directory: str | Path, start: int = 0) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_hwc_uint8(images_uint8)):
        _pil(img).save(directory / f"{start + i:06d}.png")


def save_npz(images_uint8: torch.Tensor, path: str | Path) -> None:
    """uint8 [N, H, W, C] under the key ``arr_0``, as the common FID evaluators expect."""
    array = to_hwc_uint8(images_uint8)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=array)

    atomic_write(Path(path), write)


def plot_points(points: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None) -> None:
    """Scatter plot of 2-D samples (and, faintly, the training data) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ax.scatter(*reference[:, :2].T.cpu().numpy(), s=2, c="0.8", label="data")
    ax.scatter(*points[:, :2].T.cpu().numpy(), s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
