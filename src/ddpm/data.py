"""Datasets, all held in memory as decoded tensors: uint8 images [N, C, H, W] or float points [N, 2].

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package when installed, from a given
directory of IDX files, or is downloaded by torchvision. MNIST and CIFAR-10 come through torchvision.
Any folder of images can be used; the 2-D toys are generated.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .captions import folder_captions, make_captions
from .config import DataConfig
from .errors import DataError
from .imagefiles import decode_image, image_array, image_files
from .rng import SEED_BATCH_ORDER, generator
from .shards import load_all_shards

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path.home() / ".cache" / "ddpm"
TOYS = ("swiss-roll", "s-curve", "moons")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "folder", "shards", *TOYS)


@dataclass
class Dataset:
    data: torch.Tensor  # uint8 [N, C, H, W] for images, float32 [N, 2] for points
    name: str
    labels: torch.Tensor | None = None  # int64 [N] class ids, when the config asks for labels
    class_names: tuple[str, ...] | None = None
    captions: list[str] | None = None  # one per example, when the config asks for captions

    @property
    def is_image(self) -> bool:
        return self.data.dtype == torch.uint8

    @property
    def channels(self) -> int:
        return self.data.shape[1]

    def __len__(self) -> int:
        return self.data.shape[0]


# ---- IDX files (MNIST / Fashion-MNIST) ----


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{path} is truncated: expected {math.prod(dims)} values, found {body.size}")
    return body.reshape(dims)


def _find_idx(root: Path, split: str, kind: str = "images") -> Path | None:
    prefix = "train" if split == "train" else "t10k"
    stem = f"{prefix}-images-idx3-ubyte" if kind == "images" else f"{prefix}-labels-idx1-ubyte"
    for candidate in (root / stem, root / f"{stem}.gz", root / "raw" / stem, root / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _torchvision_dataset(name: str, root: Path, split: str):
    try:
        import torchvision.datasets as tvd
    except Exception:  # not installed, or built for another torch (fails at import with RuntimeError)
        raise DataError(
            f"{name} needs torchvision to download it (pip install torchvision), or a directory that holds "
            "it (data_dir, or the config's data.root)",
            field="data_dir",
        ) from None
    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        return cls(str(root), train=split == "train", download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise DataError(
            f"could not download {name} to {root} ({type(e).__name__}: {e}); give a directory that holds it "
            "(data_dir, or the config's data.root)",
            field="data_dir",
        ) from None


def load_idx_dataset(name: str, root: str | None, split: str, kind: str = "images") -> torch.Tensor:
    """MNIST-style data from IDX files in root, Debian's package, or a torchvision download:
    images as uint8 [N, 1, H, W], or (kind="labels") class indices [N]."""
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist")
        torchvision_folder = path / {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
        found = _find_idx(path, split, kind) or _find_idx(torchvision_folder, split, kind)
        if found is None:
            raise DataError(f"no {split} IDX {kind} (e.g. train-{kind}-idx*-ubyte.gz) in {path}")
    elif name == "fashion-mnist" and _find_idx(DEBIAN_FASHION_MNIST, split, kind):
        found = _find_idx(DEBIAN_FASHION_MNIST, split, kind)
    else:
        ds = _torchvision_dataset(name, CACHE / name, split)
        return ds.data.clone()[:, None] if kind == "images" else ds.targets.clone().long()
    array = torch.from_numpy(read_idx(found).copy())
    return array[:, None] if kind == "images" else array.long()


def _read_cifar_binary(folder: Path, split: str, kind: str = "images") -> np.ndarray:
    """The binary CIFAR-10 release: records of 1 label byte + 3072 pixel bytes (CHW)."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    parts = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 file {path} is missing")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % 3073:
            raise DataError(f"CIFAR-10 file {path} is truncated")
        records = raw.reshape(-1, 3073)
        parts.append(records[:, 0] if kind == "labels" else records[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(parts)


def load_cifar10(root: str | None, split: str, kind: str = "images") -> torch.Tensor:
    """CIFAR-10 from a directory holding the binary release (cifar-10-batches-bin), or via torchvision
    (which reads or downloads the Python release into root): images uint8 [N, 3, 32, 32], or
    (kind="labels") class indices [N]."""
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist")
        for folder in (path, path / "cifar-10-batches-bin"):
            if (folder / "test_batch.bin").is_file():
                array = torch.from_numpy(_read_cifar_binary(folder, split, kind))
                return array.long() if kind == "labels" else array
    ds = _torchvision_dataset("cifar10", Path(root) if root else CACHE / "cifar10", split)
    if kind == "labels":
        return torch.tensor(ds.targets, dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()


# ---- image folders ----


def load_image_folder(root: str | None, size: int, channels: int | None) -> torch.Tensor:
    """Every image below ``root`` (recursively), resized on the short side and centre-cropped.

    Grayscale stays 1 channel when every image is grayscale, unless ``channels`` asks for 3.
    """
    decoded = [decode_image(file, str(file)) for file in image_files(root)]
    grayscale = all(is_gray for _, is_gray in decoded)
    channels = channels or (1 if grayscale else 3)
    return torch.from_numpy(np.stack([image_array(img, size, channels) for img, _ in decoded]))


# ---- 2-D toys ----


def make_toy(name: str, n: int, seed: int) -> torch.Tensor:
    """Standardised 2-D point clouds (zero mean, unit variance per axis)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if name == "swiss-roll":
        t = 1.5 * math.pi * (1 + 2 * u)
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
        pts += 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    elif name == "s-curve":
        t = 3 * math.pi * (u - 0.5)
        pts = torch.stack([torch.sin(t), torch.sign(t) * (torch.cos(t) - 1)], dim=1)
        pts += 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    elif name == "moons":
        upper = torch.rand(n, generator=g) < 0.5
        angle = math.pi * u
        x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        pts = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        raise DataError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOYS)}")
    pts = (pts - pts.mean(0)) / pts.std(0)
    return pts.float()


# ---- entry point ----


def match_images(images: torch.Tensor, size: int, channels: int | None) -> torch.Tensor:
    """Resize (antialiased) and convert channels of a uint8 image tensor."""
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif channels == 1 and images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    if images.shape[-1] != size or images.shape[-2] != size:
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    name = cfg.dataset
    if cfg.split not in ("train", "test"):
        raise DataError(f"data split must be train or test, got {cfg.split!r}")
    if name in TOYS:
        if cfg.labels != "none":
            raise DataError(f"dataset {name} has no class labels or captions; use data.labels=none")
        return Dataset(make_toy(name, cfg.num_points, seed), name)
    if name in ("fashion-mnist", "mnist"):
        images = load_idx_dataset(name, cfg.root, cfg.split)
    elif name == "cifar10":
        images = load_cifar10(cfg.root, cfg.split)
    elif name == "folder":
        images = load_image_folder(cfg.root, cfg.image_size, cfg.channels)
    elif name == "shards":  # all of them, for evaluation and figures; training streams them instead
        images = load_all_shards(cfg.root, cfg.image_size, cfg.channels)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if len(images) == 0:
        raise DataError(f"dataset {name} is empty")
    folder_text = name == "folder" and cfg.labels == "captions"  # an image folder's own captions
    labels, class_names = (None, None)
    if cfg.labels == "classes" or (cfg.labels == "captions" and not folder_text):
        labels, class_names = load_labels(cfg)
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{name} {cfg.split}: {len(images)} images but {len(labels)} labels")
    captions = None
    if folder_text:
        captions = folder_captions(cfg.root, image_files(cfg.root))
    elif cfg.labels == "captions":
        captions = make_captions(images, labels, class_names, attribute_dropout=cfg.caption_attribute_dropout)
    images = match_images(images, cfg.image_size, cfg.channels)
    return Dataset(images, name, labels, class_names, captions)


CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def load_labels(cfg: DataConfig) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Class ids [N] and class names of a dataset: the published labels, or for an image folder its
    first-level sub-folders (one per class, in sorted order), asked for with data.labels = "classes"."""
    name = cfg.dataset
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, cfg.root, cfg.split, kind="labels"), CLASS_NAMES[name]
    if name == "cifar10":
        return load_cifar10(cfg.root, cfg.split, kind="labels"), CLASS_NAMES[name]
    if name == "folder":
        root = Path(cfg.root)
        loose = [f for f in image_files(cfg.root) if f.parent == root]
        if loose:
            raise DataError(
                f"with data.labels=classes every image must be in a class sub-folder of {root}; "
                f"{loose[0].name} is not"
            )
        classes = [f.relative_to(root).parts[0] for f in image_files(cfg.root)]
        names = tuple(sorted(set(classes)))
        return torch.tensor([names.index(c) for c in classes], dtype=torch.long), names
    raise DataError(f"dataset {name} has no class labels; use data.labels=none")


class BatchOrder:
    """Which examples make up the batch of each step: a fresh seeded permutation every epoch.

    The order is a pure function of (seed, step), so a resumed run sees exactly the data it would have.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = generator(self.seed, SEED_BATCH_ORDER, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start, remaining, parts = step * self.batch_size, self.batch_size, []
        while remaining:  # a batch may straddle two epochs (or more, for tiny datasets)
            epoch, offset = divmod(start, self.n)
            take = min(remaining, self.n - offset)
            parts.append(self._permutation(epoch)[offset : offset + take])
            start, remaining = start + take, remaining - take
        return torch.cat(parts)
