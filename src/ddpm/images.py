"""Images as the package hands them around: conversion between uint8 pixels and the model's [-1, 1],
and writing / reading samples (grids, single PNGs, the uint8 .npz that FID tools read, 2-D plots)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .files import atomic_write


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 in 0..255 -> float in [-1, 1] (x / 127.5 - 1, as the original code)."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 0..255, rounding to the nearest level (the quantisation used for evaluation)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


GRID_LIMIT = 256  # the most images a grid shows (every sample is still in images/ and samples.npz)


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """A grid of the first GRID_LIMIT images (``nrow`` a row)."""
    grid = _pil(make_grid(images_uint8[:GRID_LIMIT], nrow))
    atomic_write(Path(path), lambda tmp: grid.save(tmp, format="PNG"))


def save_pngs(images_uint8: torch.Tensor, directory: str | Path, start: int = 0) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_hwc_uint8(images_uint8)):
        _pil(img).save(directory / f"{start + i:06d}.png")


def save_class_grid(images_uint8: torch.Tensor, labels: torch.Tensor, path: str | Path) -> None:
    """A grid with one row per class present in ``labels`` (in class order; the first GRID_LIMIT classes),
    blank cells padding the rows of classes with fewer samples; each row the class's first samples, as
    many as keep the grid within GRID_LIMIT cells (at least one)."""
    classes = labels.unique().tolist()[:GRID_LIMIT]
    per_row = max(1, GRID_LIMIT // len(classes))
    rows = [images_uint8[labels == c][:per_row] for c in classes]
    width = max(len(r) for r in rows)
    cells = torch.zeros(len(rows) * width, *images_uint8.shape[1:], dtype=torch.uint8)
    for i, row in enumerate(rows):
        cells[i * width : i * width + len(row)] = row
    save_grid(cells, path, nrow=width)


def save_npz(images_uint8: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> None:
    """uint8 [N, H, W, C] under the key ``arr_0``, as the common FID evaluators expect; the class id of
    each sample (int64 [N]) under ``labels`` when they were conditioned on classes."""
    arrays = {"arr_0": to_hwc_uint8(images_uint8)}
    if labels is not None:
        arrays["labels"] = labels.cpu().long().numpy()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(Path(path), write)


def load_samples(path: str | Path) -> torch.Tensor:
    """uint8 samples [N, C, H, W] from a `.npz` (arr_0 of N,H,W,C, as `ddpm sample` writes) or a folder
    holding samples.npz."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise DataError(f"no samples at {path}; give a samples.npz written by `ddpm sample`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            array = npz["arr_0"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read samples from {path} ({e})") from None
    if array.ndim == 4 and array.shape[0] == 0:
        raise DataError(f"{path} holds no samples")
    if array.dtype != np.uint8 or array.ndim != 4:
        raise DataError(
            f"{path}: expected uint8 arr_0 of shape (N, H, W, C), got {array.dtype} {array.shape}"
        )
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def load_sample_labels(path: str | Path) -> torch.Tensor | None:
    """The class id of each sample in a samples.npz (or its folder), None when it holds none."""
    path = Path(path)
    path = path / "samples.npz" if path.is_dir() else path
    try:
        with np.load(path, allow_pickle=False) as npz:
            return torch.from_numpy(npz["labels"]) if "labels" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read samples from {path} ({e})") from None


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
