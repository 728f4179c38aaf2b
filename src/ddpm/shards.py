"""Image datasets too large for memory: tar shards in the WebDataset layout, streamed during training.

A shard is a tar file whose members are one image each, named KEY.EXT (WebDataset's layout: the files of
one sample share a key; other tools read these shards, and later conditioning adds KEY.txt captions).
Beside the shards, shards.json lists them with their image counts and the images' channels, so that a
reader knows the epoch's size without reading everything. The shards live in a directory or behind a URL
prefix (http, https or file): ROOT/shards.json and ROOT/NAME for each shard.

How a stream is dealt (``ShardStream``): in epoch e the shards are shuffled with a generator from
(seed, e) and dealt round-robin to the readers, one reader per (process, loader worker); each reader
shuffles each of its shards' images with a generator from (seed, e, shard) and yields them. So every
epoch reads every image exactly once at any number of processes and workers, and a reader's stream is a
pure function of (seed, its reader index, the reader count). Resuming at step s skips, without decoding,
the images the reader had already delivered: exact at the same process and worker counts, the same
epoch position at others. What it does not promise: the in-memory datasets' bit-exact order.
"""

from __future__ import annotations

import io
import json
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, decode_image, image_array, image_files
from .errors import DataError
from .files import atomic_write, write_json
from .rng import SEED_BATCH_ORDER, derived_seed

INDEX_NAME = "shards.json"
FORMAT = "ddpm-shards"


def make_shards(folder: str | Path, out: str | Path, shard_size: int = 1000) -> dict:
    """Write every image below ``folder`` into tar shards of ``shard_size`` images in ``out`` (the
    original file bytes, keys in sorted order), plus shards.json. Returns the index."""
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    files = image_files(str(folder), "shards")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".shard-*.tmp"):  # of a killed earlier run
        leftover.unlink()
    shards, grayscale = [], True
    for first in range(0, len(files), shard_size):
        name = f"shard-{first // shard_size:06d}.tar"
        part = files[first : first + shard_size]
        for file in part:  # every image must decode: a bad one is found now, not days into training
            grayscale &= decode_image(file, str(file))[1]

        def write(tmp, part=part, first=first):
            with tarfile.open(tmp, "w") as tar:
                for i, file in enumerate(part):
                    tar.add(file, arcname=f"{first + i:09d}{file.suffix.lower()}")

        atomic_write(out / name, write)
        shards.append({"name": name, "count": len(part)})
    index = {
        "format": FORMAT,
        "version": 1,
        "count": len(files),
        "channels": 1 if grayscale else 3,
        "shards": shards,
    }
    write_json(out / INDEX_NAME, index)
    written = {s["name"] for s in shards}
    for old in out.glob("shard-*.tar"):  # of an earlier, larger run: no index lists them any more
        if old.name not in written:
            old.unlink()
    return index


def _is_url(root: str) -> bool:
    return "://" in root


def _open(root: str, name: str):
    """A binary file object for ROOT/NAME, local or remote."""
    if _is_url(root):
        try:
            return urllib.request.urlopen(f"{root.rstrip('/')}/{name}", timeout=60)
        except OSError as e:
            raise DataError(f"cannot fetch {root.rstrip('/')}/{name}: {e}") from None
    try:
        return open(Path(root) / name, "rb")
    except OSError as e:
        raise DataError(f"cannot read {Path(root) / name}: {e.strerror}") from None


@dataclass(frozen=True)
class ShardIndex:
    root: str
    shards: tuple[tuple[str, int], ...]  # (name, image count)
    channels: int

    @classmethod
    def load(cls, root: str | None) -> ShardIndex:
        if root is None:
            raise DataError("dataset 'shards' needs the shards' directory or URL (--data-dir)")
        with _open(str(root), INDEX_NAME) as f:
            try:
                index = json.loads(f.read())
                shards = tuple((s["name"], int(s["count"])) for s in index["shards"])
                channels = int(index["channels"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{root}/{INDEX_NAME} is not a shard index ({e})") from None
        if index.get("format") != FORMAT or not shards or any(c <= 0 for _, c in shards):
            raise DataError(f"{root}/{INDEX_NAME} is not a ddpm shard index with images")
        if channels not in (1, 3):
            raise DataError(f"{root}/{INDEX_NAME} says the images have {channels} channels; 1 or 3")
        return cls(str(root), shards, channels)

    def check(self, readers: int) -> None:
        """Fail now, not at some later step, if the shards cannot feed ``readers`` (processes x loader
        workers) or a local shard is missing."""
        if readers > len(self.shards):
            raise DataError(
                f"{len(self.shards)} shards cannot feed {readers} readers (processes x loader workers): "
                "every reader needs a shard each epoch; make more, smaller shards"
            )
        if not _is_url(self.root):
            missing = [name for name, _ in self.shards if not (Path(self.root) / name).is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} shard(s) listed in {INDEX_NAME} are missing, e.g. {missing[0]}"
                )

    def read(self, shard: int) -> list[tuple[str, bytes]]:
        """The encoded images of one shard, (member name, bytes) in tar order, streamed in one pass."""
        name, count = self.shards[shard]
        images = []
        try:
            with _open(self.root, name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                        images.append((f"{name}/{member.name}", tar.extractfile(member).read()))
        except tarfile.TarError as e:
            raise DataError(f"shard {name} is damaged ({e})") from None
        if len(images) != count:
            raise DataError(f"shard {name} holds {len(images)} images; {INDEX_NAME} says {count}")
        return images


def load_all_shards(
    root: str | None, image_size: int, channels: int | None, limit: int | None = None
) -> torch.Tensor:
    """Every image of every shard (or the first ``limit``), in index and tar order, as one uint8
    [N, C, H, W] tensor (for evaluation and figures on small shard sets; training streams them)."""
    index = ShardIndex.load(root)
    channels = channels or index.channels
    images = []
    for shard in range(len(index.shards)):
        for name, data in index.read(shard)[: None if limit is None else limit - len(images)]:
            images.append(image_array(decode_image(io.BytesIO(data), name)[0], image_size, channels))
        if limit is not None and len(images) >= limit:
            break
    return torch.from_numpy(np.stack(images))


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of ``batch`` images for process ``rank`` of ``world_size``, forever, epoch after epoch,
    from batch ``skip_batches`` on. Each process has ``workers`` readers (one per loader worker), and
    batch j comes from its reader j mod workers."""

    def __init__(self, index: ShardIndex, image_size: int, channels: int, seed: int, batch: int, **deal):
        self.index, self.image_size, self.channels, self.seed, self.batch = (
            index,
            image_size,
            channels,
            seed,
            batch,
        )
        self.rank, self.world_size = deal["rank"], deal["world_size"]
        self.workers, self.skip_batches = deal["workers"], deal["skip_batches"]

    def shards_of(self, reader: int, readers: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derived_seed(self.seed, SEED_BATCH_ORDER, epoch))
        order = torch.randperm(len(self.index.shards), generator=g).tolist()
        return order[reader::readers]

    def images(self, reader: int, readers: int, skip: int) -> Iterator[np.ndarray]:
        """Reader ``reader``'s images as uint8 [C, H, W], after passing over ``skip`` of them."""
        epoch = 0
        while True:
            for shard in self.shards_of(reader, readers, epoch):
                count = self.index.shards[shard][1]
                if skip >= count:  # delivered before the resume: not even fetched
                    skip -= count
                    continue
                encoded = self.index.read(shard)
                g = torch.Generator().manual_seed(derived_seed(self.seed, SEED_BATCH_ORDER, epoch, shard + 1))
                for i in torch.randperm(count, generator=g).tolist()[skip:]:  # decoded only when used
                    img, _ = decode_image(io.BytesIO(encoded[i][1]), encoded[i][0])
                    yield image_array(img, self.image_size, self.channels)
                skip = 0
            epoch += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # Batch j of this process comes from reader slot j mod workers. The loader takes batches from
        # its workers in turn, starting with worker 0 at batch skip_batches, so worker w serves slot
        # (skip_batches + w) mod workers, which already made the batches j < skip_batches of its slot.
        slot = (self.skip_batches + worker) % self.workers
        done = len(range(slot, self.skip_batches, self.workers))
        stream = self.images(
            self.rank * self.workers + slot, self.world_size * self.workers, done * self.batch
        )
        while True:
            yield torch.from_numpy(np.stack([next(stream) for _ in range(self.batch)]))


def stream_batches(
    root: str | None,
    image_size: int,
    channels: int | None,
    seed: int,
    batch: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    start_batch: int = 0,
) -> tuple[ShardIndex, Iterator[torch.Tensor]]:
    """Batches of ``batch`` uint8 images for process ``rank`` of ``world_size``, from batch
    ``start_batch`` on (the resumed step), decoded in ``workers`` loader processes."""
    index = ShardIndex.load(root)
    index.check(world_size * max(workers, 1))
    deal = dict(rank=rank, world_size=world_size, workers=max(workers, 1), skip_batches=start_batch)
    dataset = ShardStream(index, image_size, channels or index.channels, seed, batch, **deal)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return index, iter(loader)
