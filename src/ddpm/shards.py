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
import re
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .files import MAX_JSON_BYTES, atomic_write, parse_json, read_json, write_json
from .imagefiles import IMAGE_EXTENSIONS, decode_image, image_array, image_files
from .rng import SEED_BATCH_ORDER, derived_seed

INDEX_NAME = "shards.json"
FORMAT = "ddpm-shards"
SHARD_NAME = re.compile(r"shard-\d{6,}\.tar")  # the names make_shards writes
MAX_SHARD_IMAGES = 10**8  # a shard count above this is not a count (shards hold thousands)
MAX_IMAGE_BYTES = 256 * 2**20  # an encoded image larger than this in a shard is refused, not read


def _owned_shards(out: Path) -> set[str]:
    """The shard files an earlier make_shards wrote in ``out``: those its shards.json lists (an unfinished
    run's lists what it was writing). A folder with shard files or a shards.json that ddpm did not write
    is refused, before anything in it is touched."""
    refuse = "so it is not written into; choose another out"
    owned = set()
    if (out / INDEX_NAME).exists():
        try:
            index = read_json(out / INDEX_NAME, expect=dict)
        except DataError as e:
            raise DataError(f"{e}: not ddpm's shard index, {refuse}", field="out") from None
        if index.get("format") != FORMAT:
            raise DataError(f"{out / INDEX_NAME} is not a ddpm shard index, {refuse}", field="out")
        entries = index.get("shards") if isinstance(index.get("shards"), list) else []
        names = [e.get("name") for e in entries if isinstance(e, dict)]
        names += index.get("writing") if isinstance(index.get("writing"), list) else []
        owned = {n for n in names if isinstance(n, str) and SHARD_NAME.fullmatch(n)}
    foreign = sorted(p.name for p in out.glob("shard-*.tar") if p.name not in owned)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DataError(
            f"{out} holds {foreign[0]}{more}, which no ddpm {INDEX_NAME} there lists: not written by "
            f"`ddpm make-shards`, {refuse}",
            field="out",
        )
    return owned


def make_shards(folder: str | Path, out: str | Path, shard_size: int = 1000, progress: bool = False) -> dict:
    """Write every image below ``folder`` into tar shards of ``shard_size`` images in ``out`` (the
    original file bytes, keys in sorted order), plus shards.json. Returns the index. Only its own files
    are ever replaced or removed: a folder holding shard files or a shards.json that make_shards did not
    write is refused untouched (other files beside them are left alone), and nothing is written before
    every image has decoded."""
    if shard_size <= 0:
        raise DataError(f"shard_size must be positive, got {shard_size}", field="shard_size")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"out {out} is a file, not a directory", field="out")
    owned = _owned_shards(out) if out.is_dir() else set()
    files = image_files(str(folder), "shards")
    grayscale = True
    for file in files:  # every image must decode: a bad one is found now (before anything is written)
        grayscale &= decode_image(file, str(file))[1]
    names = [f"shard-{i:06d}.tar" for i in range(-(-len(files) // shard_size))]
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".shard-*.tmp"):  # of a killed earlier run
        leftover.unlink()
    # Until the shards are written, the index lists every shard file of ddpm's there, old and new, so that
    # a killed run leaves a folder the next run knows as its own (and readers a clear error).
    writing = {"format": FORMAT, "version": 1, "count": 0, "channels": 1 if grayscale else 3, "shards": []}
    write_json(out / INDEX_NAME, {**writing, "writing": sorted(owned | set(names))})
    shards = []
    from tqdm.auto import tqdm

    # (a bar for the writing only: a refusal above stays one line on stderr)
    for first in tqdm(range(0, len(files), shard_size), desc="shards", unit="shard", disable=not progress):
        name = f"shard-{first // shard_size:06d}.tar"
        part = files[first : first + shard_size]

        def write(tmp, part=part, first=first):
            with tarfile.open(tmp, "w") as tar:
                for i, file in enumerate(part):
                    tar.add(file, arcname=f"{first + i:09d}{file.suffix.lower()}")

        atomic_write(out / name, write)
        shards.append({"name": name, "count": len(part)})
    for old in sorted(owned - set(names)):  # of an earlier, larger run: only ddpm's own, never others'
        (out / old).unlink(missing_ok=True)
    index = {**writing, "count": len(files), "shards": shards}
    write_json(out / INDEX_NAME, index)
    return index


def _is_url(root: str) -> bool:
    return "://" in root


def _open(root: str, name: str):
    """A binary file object for ROOT/NAME, local or remote."""
    if _is_url(root):
        try:
            return urllib.request.urlopen(f"{root.rstrip('/')}/{urllib.parse.quote(name)}", timeout=60)
        except OSError as e:
            raise DataError(f"cannot fetch {root.rstrip('/')}/{name}: {e}") from None
    try:
        return open(Path(root) / name, "rb")
    except OSError as e:
        raise DataError(f"cannot read {Path(root) / name}: {e.strerror}") from None


def _inside(root: str, name: str) -> None:
    """Refuse a local shard that leads outside the shards' folder (a symbolic link out of it)."""
    folder = Path(root).resolve()
    target = (folder / name).resolve()
    if not target.is_relative_to(folder):
        raise DataError(f"shard {name} in {root} leads outside it (to {target}); shards must lie inside")


def _shard_entry(entry, where: str) -> tuple[str, int]:
    """(name, image count) of one shard of an index: a plain file name in the folder (no path: never
    one outside it) and a whole number of images (never a float, NaN or a number no shard holds)."""
    if not isinstance(entry, dict) or "name" not in entry or "count" not in entry:
        raise DataError(f'{where} is not a shard index (a shard without "name" and "count")')
    name, count = entry["name"], entry["count"]
    plain = isinstance(name, str) and name.isprintable() and name not in ("", ".", "..")
    if not plain or "/" in name or "\\" in name:
        raise DataError(f"{where} names a shard {name!r}: shards must be plain file names inside the folder")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARD_IMAGES:
        raise DataError(
            f"{where} says shard {name} holds {count!r} images; a count is a whole number from 1 to "
            f"{MAX_SHARD_IMAGES:,}"
        )
    return name, count


@dataclass(frozen=True)
class ShardIndex:
    root: str
    shards: tuple[tuple[str, int], ...]  # (name, image count)
    channels: int

    @classmethod
    def load(cls, root: str | None) -> ShardIndex:
        if root is None:
            raise DataError(
                "dataset 'shards' needs the shards' directory or URL (data_dir, or the config's data.root)",
                field="data_dir",
            )
        where = f"{str(root).rstrip('/')}/{INDEX_NAME}"
        with _open(str(root), INDEX_NAME) as f:
            try:
                data = f.read(MAX_JSON_BYTES + 1)
            except OSError as e:
                raise DataError(f"cannot read {where}: {e}") from None
        index = parse_json(data, where, expect=dict)
        if index.get("format") == FORMAT and "writing" in index:
            raise DataError(f"{where} is being written by `ddpm make-shards` (or it was stopped: rerun it)")
        if index.get("format") != FORMAT or not isinstance(index.get("shards"), list) or not index["shards"]:
            raise DataError(f"{where} is not a ddpm shard index with images")
        shards = tuple(_shard_entry(entry, where) for entry in index["shards"])
        channels = index.get("channels")
        if isinstance(channels, bool) or channels not in (1, 3):
            raise DataError(f"{where} says the images have {channels!r} channels; 1 or 3")
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
            for name, _ in self.shards:
                _inside(self.root, name)
            missing = [name for name, _ in self.shards if not (Path(self.root) / name).is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} shard(s) listed in {INDEX_NAME} are missing, e.g. {missing[0]}"
                )

    def read(self, shard: int) -> list[tuple[str, bytes]]:
        """The encoded images of one shard, (member name, bytes) in tar order, streamed in one pass."""
        name, count = self.shards[shard]
        if not _is_url(self.root):
            _inside(self.root, name)
        images, found = [], 0
        try:
            with _open(self.root, name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    found += 1
                    if found > count:  # counted, not read: the index's count bounds what is held
                        continue
                    shown = member.name if member.name.isprintable() else ascii(member.name)
                    if member.size > MAX_IMAGE_BYTES:
                        size = f"{member.size:,} bytes; at most {MAX_IMAGE_BYTES:,}"
                        raise DataError(f"shard {name}: image {shown} is {size}")
                    images.append((f"{name}/{shown}", tar.extractfile(member).read()))
        except (tarfile.TarError, EOFError) as e:
            raise DataError(f"shard {name} is damaged ({e})") from None
        if found != count:
            raise DataError(f"shard {name} holds {found} images; {INDEX_NAME} says {count}")
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
