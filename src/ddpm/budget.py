"""Training to a wall-clock budget: a run given ``train.budget_minutes`` times its first steps, fixes its
step count from that speed, and from then on is a run of that many steps (its learning-rate schedule ends
at its last step, and resuming it continues the same run).

The probe is steps PROBE_START..PROBE_END-1: the first steps carry one-off costs (allocation, the
autotuning of kernels, torch.compile) that the rest of the run does not. Until the count is fixed the
learning rate has no decay yet: a schedule's decay over a run of N steps changes the probe's steps by a
factor of at least cos(pi * 25 / N) ~ 1 - 3e-4 at the demo's N, so the budgeted run differs from an
N-step run by that on its first 25 steps alone. The budget counts training time (the steps), as
``train.time_limit_minutes`` does: checkpoints and sample grids are extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

PROBE_START, PROBE_END = 5, 25


@dataclass
class Budget:
    """A run's budget (``seconds`` of training) and, once measured, its fixed step count."""

    seconds: float
    steps: int | None = None  # fixed at PROBE_END
    seconds_per_step: float | None = None
    probe_seconds: float = 0.0  # the probe's steps timed so far (a run resumed mid-probe goes on)
    probe_steps: int = 0

    @classmethod
    def of(cls, minutes: float | None, state: dict | None = None) -> Budget | None:
        """The budget of a run with ``minutes`` (None: no budget), as a checkpoint's ``state`` left it."""
        if minutes is None:
            return None
        budget = cls(minutes * 60)
        for name, value in (state or {}).items():
            setattr(budget, name, value)
        return budget

    @property
    def fixed(self) -> bool:
        return self.steps is not None

    def total_steps(self) -> int:
        """train.steps for the run: the fixed count, or the probe's end until it is known."""
        return self.steps if self.fixed else PROBE_END

    def record(self) -> dict:
        """What a checkpoint keeps (``of`` reads it back) and a run reports."""
        state = {"steps": self.steps, "seconds_per_step": self.seconds_per_step}
        if not self.fixed:
            state = {"probe_seconds": self.probe_seconds, "probe_steps": self.probe_steps}
        return state

    def observe(self, step: int, seconds: float, train_seconds: float, largest: Callable) -> int | None:
        """Step ``step`` (0-based) took ``seconds``; the run has trained ``train_seconds`` in all. After the
        probe's last step, fix and return the step count: as many steps as the rest of the budget holds at
        the slowest process's speed (``largest`` agrees on a value over the processes), and at least the
        probe."""
        if self.fixed:
            return None
        if PROBE_START <= step < PROBE_END:
            self.probe_seconds += seconds
            self.probe_steps += 1
        if step + 1 < PROBE_END:
            return None
        self.seconds_per_step = largest(self.probe_seconds / max(self.probe_steps, 1))
        left = max(self.seconds - train_seconds, 0.0)
        self.steps = step + 1 + math.floor(left / max(self.seconds_per_step, 1e-9))
        return self.steps
