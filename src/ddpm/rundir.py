"""A run directory's bookkeeping: one owner at a time (an OS lock), no leftovers from killed writers,
and a metrics log that never runs ahead of the checkpoint.

The lock is an flock on RUN/.lock: the OS drops it when its process dies, even by SIGKILL, so a killed
run never blocks its own resume.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .errors import ConfigError
from .files import atomic_write_text

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_file = None

    def lock(self) -> None:
        """Own the directory (creating it), or raise a ConfigError naming the process that owns it."""
        if self._lock_file is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(
                f"{self.path} is in use by another ddpm process (pid {owner}); wait for it or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    def remove_temporary_files(self) -> list[Path]:
        """Delete what killed atomic writes left behind (.NAME.*.tmp); only safe while locked."""
        leftovers = [p for folder in (self.path, self.path / "samples") for p in folder.glob(".*.tmp")]
        for p in leftovers:
            p.unlink(missing_ok=True)
        return leftovers

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    def keep_metrics_up_to(self, step: int) -> int:
        """Drop the metrics rows logged after ``step`` (the checkpoint's): a run killed after logging
        them repeats those steps when resumed. Returns how many rows were dropped."""
        path = self.metrics_path
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a row cut short by a kill
                dropped += 1
                continue
            if row_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return dropped
