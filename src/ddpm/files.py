"""Writing files so that a crash never leaves a half-written one: write aside, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it to ``path`` (same directory), so that
    readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, value) -> None:
    """``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


class OutputFolder:
    """A folder of results written all at once: they are made in a staging folder inside it
    (.partial-*) and moved into place at the end, the description (``last``) after everything else. A
    run killed midway leaves the previous results whole and a staging folder the next run removes; one
    that cannot write there fails before any work, not after."""

    def __init__(self, path: str | Path, last: str):
        self.path = Path(path)
        self.last = last
        self.path.mkdir(parents=True, exist_ok=True)  # a file in the way: FileExistsError, one line
        for leftover in self.path.glob(".partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.path))  # read-only: OSError

    def stale(self, names: list[str]) -> list[str]:
        """Earlier results that ``names`` do not replace: publishing removes them."""
        return sorted(p.name for p in self.path.iterdir() if p.name in PUBLISHED and p.name not in names)

    def publish(self, names: list[str]) -> None:
        """Move the staged ``names`` (and then ``last``) into place, replacing earlier ones, and remove
        the stale ones."""
        (self.path / self.last).unlink(missing_ok=True)  # no description of a half-replaced folder
        for name in self.stale(names):
            _remove(self.path / name)
        for name in [*names, self.last]:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                _remove(target)
            os.replace(self.staging / name, target)
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


# Every name an OutputFolder of samples may hold; earlier ones the new results lack are stale.
PUBLISHED = {"grid.png", "images", "samples.npz", "points.npy", "points.png"}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
