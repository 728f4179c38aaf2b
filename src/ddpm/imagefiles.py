"""Image files: finding them below a folder, decoding them (8-bit grayscale or RGB, 16-bit grayscale
scaled rather than clipped) and resizing them on the short side with a centre crop. Image folders
(:mod:`ddpm.data`) and tar shards (:mod:`ddpm.shards`) both read their images with these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def _center_crop_resize(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    if scale != 1:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_8bit_gray(img):
    """A grayscale PIL image as 8-bit "L". 16-bit images (PNG/TIFF, modes I;16* and I) are scaled from
    0..65535 (convert("L") would clip them at 255); float images ("F") are taken to lie in [0, 1]."""
    from PIL import Image

    if img.mode in ("1", "L", "LA"):
        return img.convert("L")
    array = np.asarray(img, dtype=np.float64)
    scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8), mode="L")


def image_files(root: str | None, dataset: str = "folder") -> list[Path]:
    """Every image file below ``root`` (recursively), sorted."""
    if root is None:
        raise DataError(
            f"dataset '{dataset}' needs a data directory (data_dir, or the config's data.root)",
            field="data_dir",
        )
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}")
    return files


def decode_image(source, name: str):
    """(PIL image in "L" or "RGB", whether it was grayscale) from a path or a binary file object."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            img.load()
            is_gray = img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            return (_to_8bit_gray(img) if is_gray else img.convert("RGB")), is_gray
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        shown = name if name.isprintable() else ascii(name)  # a file name never breaks the one line
        raise DataError(f"cannot read image {shown}: {e}") from None


def image_array(img, size: int, channels: int) -> np.ndarray:
    """A decoded image resized on the short side, centre-cropped to ``size`` and given ``channels``
    (1 or 3), as uint8 [C, H, W]."""
    array = np.asarray(
        _center_crop_resize(img, size).convert("L" if channels == 1 else "RGB"), dtype=np.uint8
    )
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
