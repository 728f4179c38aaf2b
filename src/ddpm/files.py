"""Writing files so that a crash never leaves a half-written one: write aside, fsync, rename."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, DataError, DDPMError

MAX_JSON_BYTES = 64 * 2**20  # the largest JSON file read: a tokenizer's is a few MiB, ddpm's records KiB
MAX_JSON_DEPTH = 64  # the deepest nesting of lists and objects read (the files read nest a few levels)
MAX_JSON_DIGITS = 100  # the longest integer read (Python refuses over 4300 digits, with advice for coders)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # what may decode to a lone surrogate


def _label(path, what: str) -> str:
    return f"{what} {path}" if what else str(path)


def read_bytes(
    path: str | Path, what: str = "", *, error: type[DDPMError] = DataError, max_bytes: int
) -> bytes:
    """The bytes of a file, or one line naming it: missing, unreadable, or larger than ``max_bytes``."""
    label = _label(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise error(f"cannot read {label}: larger than {max_bytes:,} bytes")
    return data


def decode_text(data: bytes, label: str, error: type[DDPMError] = DataError) -> str:
    """UTF-8 ``data`` as text (a leading byte-order mark dropped), or one line saying where it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"cannot read {label}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_text(
    path: str | Path, what: str = "", *, error: type[DDPMError] = DataError, max_bytes: int = MAX_JSON_BYTES
) -> str:
    """The UTF-8 text of a file of at most ``max_bytes``, or one line naming the file and its fault."""
    return decode_text(read_bytes(path, what, error=error, max_bytes=max_bytes), _label(path, what), error)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is too long")
    return int(text)


def check_tree(value, label: str, error: type[DDPMError] = DataError, strings: bool = True) -> None:
    """Refuse a parsed value (of JSON or TOML) nested more than MAX_JSON_DEPTH deep or (``strings``)
    holding a string that is not Unicode text (a lone surrogate, from an escape), in one line naming
    ``label``; walked without recursion."""
    kinds = str | dict | list if strings else dict | list
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    lone = ascii(item[e.start])
                    raise error(f"cannot read {label}: a string that is not Unicode (lone {lone})") from None
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise error(f"cannot read {label}: nested more than {MAX_JSON_DEPTH} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, kinds))


def parse_json(
    text: str | bytes,
    label: str,
    *,
    error: type[DDPMError] = DataError,
    expect: type | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    strict: bool = True,
):
    """JSON ``text`` (``label`` names it in errors: a file, a line of one, a checkpoint's metadata) as a
    value, refusing in one line: more than ``max_bytes``, bytes that are not UTF-8, invalid JSON, nesting
    deeper than MAX_JSON_DEPTH, (``expect``) a value of another type and, when ``strict``, NaN or infinite
    numbers and escapes of lone surrogates (not ``strict``: what Python's json.dumps writes of a NaN or of
    a file name that is not UTF-8 is read as written)."""
    if len(text) > max_bytes:
        raise error(f"cannot read {label}: larger than {max_bytes:,} bytes")
    if isinstance(text, bytes):
        text = decode_text(text, label, error)
    try:
        numbers = dict(parse_constant=_refuse_constant, parse_float=_finite_float) if strict else {}
        value = json.loads(text, parse_int=_bounded_int, **numbers)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 or "\n" in text else f"column {e.colno}"
        raise error(f"cannot read {label}: not valid JSON ({at}: {e.msg})") from None
    except ValueError as e:
        raise error(f"cannot read {label}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"cannot read {label}: nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_tree(value, label, error, strings=strict and SURROGATE_ESCAPE.search(text) is not None)
    if expect is not None and not isinstance(value, expect):
        kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        found = kinds.get(type(value), "a number")
        raise error(f"{label} holds a JSON {found.split()[-1]}, not {kinds.get(expect, expect.__name__)}")
    return value


def read_json(
    path: str | Path,
    what: str = "",
    *,
    error: type[DDPMError] = DataError,
    expect: type | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    strict: bool = True,
):
    """The JSON value in the file ``path`` (``what`` says what it is, for errors), read the one safe
    way: any fault (missing, too large, not UTF-8, invalid JSON, too deep, not ``expect``; when
    ``strict``, NaN or a lone surrogate) is one line of ``error`` naming the file. Records ddpm writes
    itself are read with ``strict=False``: json.dumps writes a NaN as NaN, and a class folder's name that
    is not UTF-8 as a lone surrogate."""
    data = read_bytes(path, what, error=error, max_bytes=max_bytes)
    return parse_json(
        data, _label(path, what), error=error, expect=expect, max_bytes=max_bytes, strict=strict
    )


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


class DirectoryLock:
    """One owner at a time for a directory: an flock on DIR/.lock holding the owner's pid. The OS drops
    it when its process dies, even by SIGKILL, so a killed owner never blocks the next one."""

    def __init__(self, path: str | Path, what: str = "ddpm process"):
        self.path, self.what, self._file = Path(path), what, None

    def acquire(self) -> None:
        """Own the directory (creating it), or raise a ConfigError naming the process that owns it."""
        if self._file is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _lock_owner(f)
                owned = f"{self.path} is in use by another {self.what} (pid {owner})"
                raise ConfigError(f"{owned}; wait for it or stop it first") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except BaseException:
            f.close()  # closing drops the lock
            raise
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lock_owner(f) -> str:
    """The pid a held lock file names. The owner writes it just after taking the lock, so an empty file is
    read again for up to a second (a process that lost a race for the lock saw it empty)."""
    for _ in range(20):
        f.seek(0)
        owner = f.read().strip()
        if owner:
            return owner
        time.sleep(0.05)
    return "unknown"


class OutputFolder:
    """A folder of results written all at once, by one process at a time (a DirectoryLock).

    The results are made in a staging folder inside it (.partial-*), the description ``last`` written
    there last, and then moved into place (the description last again). A run killed while computing
    leaves the previous results whole and an unfinished staging folder, which the next run removes; one
    killed while moving them into place leaves a finished staging folder, whose moves the next run
    completes. A folder that cannot be written fails before any work, not after. Earlier results of
    these names are replaced only in a folder that holds a description (that ddpm wrote): others are
    refused rather than overwritten."""

    def __init__(self, path: str | Path, last: str):
        self.path, self.last = Path(path), last
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"out_dir {self.path} is a file, not a directory", field="out_dir")
        self.lock = DirectoryLock(self.path, "ddpm process writing there")
        self.lock.acquire()
        try:
            for leftover in sorted(self.path.glob(".partial-*")):
                if leftover.is_symlink() or not leftover.is_dir():
                    continue  # not a staging folder ddpm made
                if (leftover / last).is_file():
                    self._move_into_place(leftover)  # killed while publishing: finish the job
                else:
                    shutil.rmtree(leftover, ignore_errors=True)
            foreign = [p.name for p in self.path.iterdir() if p.name in PUBLISHED]
            if foreign and not (self.path / last).is_file():
                raise ConfigError(
                    f"{self.path} holds {', '.join(sorted(foreign))} but no {last}: not ddpm's output, so "
                    "it is not replaced; choose another out_dir",
                    field="out_dir",
                )
            self.staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.path))  # read-only: OSError
        except BaseException:
            self.lock.release()
            raise

    def stale(self, names: list[str]) -> list[str]:
        """Earlier results that ``names`` do not replace: publishing removes them."""
        return sorted(p.name for p in self.path.iterdir() if p.name in PUBLISHED and p.name not in names)

    def publish(self) -> None:
        """Move the staged results (which must include ``last``) into place, replacing earlier ones and
        removing the stale ones."""
        if not (self.staging / self.last).is_file():
            raise ValueError(f"the staged results have no {self.last}")
        self._move_into_place(self.staging)
        self.lock.release()

    def _move_into_place(self, staging: Path) -> None:
        manifest = staging / ".names"  # what this publish moves, kept for a run that must finish it
        if manifest.is_file():
            names = read_json(manifest, error=ConfigError, expect=list)
            planted = [name for name in names if not (isinstance(name, str) and name in PUBLISHED)]
            if planted:  # only ddpm's own result names, never a path out of the folder
                raise ConfigError(
                    f"{manifest} lists {planted[0]!r}, which ddpm never writes: it is not ddpm's; "
                    f"remove {staging} or choose another out_dir",
                    field="out_dir",
                )
        else:
            names = sorted(p.name for p in staging.iterdir() if p.name not in (".old", self.last))
            atomic_write_text(manifest, json.dumps(names))
        old = staging / ".old"  # what is replaced goes here first: every step is a rename
        old.mkdir(exist_ok=True)
        description = self.path / self.last
        if description.exists():
            os.replace(description, old / self.last)  # no description of a half-replaced folder
        for name in [*self.stale(names), *names]:
            if (staging / name).exists():  # (else moved before a kill)
                if (self.path / name).exists():
                    os.replace(self.path / name, old / name)
                os.replace(staging / name, self.path / name)
            elif name not in names and (self.path / name).exists():  # stale
                os.replace(self.path / name, old / name)
        os.replace(staging / self.last, description)
        shutil.rmtree(staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()


# Every name an OutputFolder (of samples, or an export) may hold; earlier ones the new results lack are stale.
PUBLISHED = {
    "grid.png",
    "images",
    "samples.npz",
    "points.npy",
    "points.png",
    "model.safetensors",
    "low-res-grid.png",
    # a diffusers folder from `ddpm export`
    "model_index.json",
    "unet",
    "scheduler",
}
