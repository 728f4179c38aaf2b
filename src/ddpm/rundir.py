"""A run directory's bookkeeping: one owner at a time (an OS lock), no leftovers from killed writers,
and a metrics log that never runs ahead of the checkpoint.

The lock is an flock on RUN/.lock: the OS drops it when its process dies, even by SIGKILL, so a killed
run never blocks its own resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import DirectoryLock, atomic_write_text

METRICS_NAME = "metrics.jsonl"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = DirectoryLock(self.path)

    def lock(self) -> None:
        """Own the directory (creating it), or raise a ConfigError naming the process that owns it."""
        self._lock.acquire()

    def unlock(self) -> None:
        self._lock.release()

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
        lines = path.read_bytes().split(b"\n")  # as bytes: a kill may cut a character in two
        for raw in lines[:-1] if lines[-1] == b"" else lines:
            try:
                line = raw.decode("utf-8")
                row_step = json.loads(line)["step"]  # (not read_json: ddpm writes a NaN loss as NaN)
            except (ValueError, KeyError, TypeError, RecursionError):  # a row cut short by a kill
                dropped += 1
                continue
            if isinstance(row_step, bool) or not isinstance(row_step, int):
                dropped += 1
            elif row_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return dropped
