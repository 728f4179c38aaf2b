"""Training to a wall-clock budget (ddpm.budget): the step count fixed from the probe's speed, the
learning-rate schedules that end at it, and a resumed budgeted run that continues the same run."""

import pytest
import torch
from conftest import tiny_config

from ddpm.budget import PROBE_END, PROBE_START, Budget
from ddpm.checkpoint import Checkpoint
from ddpm.errors import ConfigError
from ddpm.train import Trainer, learning_rate


def alone(value):  # one process: its value is the largest
    return value


def test_the_step_count_is_what_the_rest_of_the_budget_holds_at_the_probes_speed():
    budget = Budget.of(1.0)  # 60 s
    assert not budget.fixed and budget.total_steps() == PROBE_END
    for step in range(PROBE_END - 1):
        # the first steps are slow (one-off costs) and are not timed
        assert budget.observe(step, 5.0 if step < PROBE_START else 0.5, 0.0, alone) is None
    # 20 timed steps at 0.5 s; 30 s trained so far, so 30 s left: 60 more steps
    assert budget.observe(PROBE_END - 1, 0.5, 30.0, alone) == PROBE_END + 60
    assert budget.record() == {"steps": PROBE_END + 60, "seconds_per_step": 0.5}
    assert Budget.of(1.0, budget.record()).total_steps() == PROBE_END + 60
    # the slowest process's speed decides, so that every process fixes the same count
    slowest = Budget.of(1.0, {"probe_seconds": 10.0, "probe_steps": 20})
    assert slowest.observe(PROBE_END - 1, 0.5, 30.0, lambda v: max(v, 1.0)) == PROBE_END + 30
    # a budget spent by the probe alone is the probe
    spent = Budget.of(0.01, {"probe_seconds": 10.0, "probe_steps": 20})
    assert spent.observe(PROBE_END - 1, 0.5, 30.0, alone) == PROBE_END


def test_schedules_decay_to_zero_at_the_last_step_and_not_before_the_count_is_known():
    assert learning_rate(5, 1.0, 10, "linear", 110) == pytest.approx(0.5 * 105 / 110)  # warm-up times decay
    assert learning_rate(60, 1.0, 10, "linear", 110) == pytest.approx(50 / 110)
    assert learning_rate(110, 1.0, 10, "linear", 110) == 0.0
    assert learning_rate(60, 1.0, 10, "cosine", 120) == pytest.approx(0.5)
    for schedule in ("linear", "cosine"):  # a budget's probe: no decay yet
        assert learning_rate(20, 1.0, 10, schedule, 0) == 1.0


class Clock:
    """A clock on which every training step takes exactly ``step`` seconds (the loop reads it once
    before and once after a step, and at each log line)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def budgeted(idx_dir, **train):
    values = dict(steps=3, budget_minutes=0.0625, lr_schedule="linear", log_every=1000)
    return tiny_config(idx_dir, **{**values, **train})


def test_a_budgeted_run_fixes_its_steps_and_resumes_as_the_same_run(idx_dir, tmp_path):
    """At 0.125 s a step (a test clock), 3.75 s of budget are the 25-step probe and 5 more steps;
    train.steps (3) is not used. Stopped by a time limit and resumed, the run ends on the same weights."""
    straight = Trainer(budgeted(idx_dir), tmp_path / "a", progress=False)
    straight.clock = Clock(0.125)
    result = straight.train()
    assert result["stopped"] == "done" and result["step"] == PROBE_END + 5 == straight.cfg.train.steps
    assert result["budget"] == {"steps": PROBE_END + 5, "seconds_per_step": 0.125}
    saved = Checkpoint(tmp_path / "a")
    assert saved.config["train"]["steps"] == PROBE_END + 5 and saved.request["train"]["steps"] == 3
    assert saved.resolved["train.steps"] == PROBE_END + 5

    first = Trainer(budgeted(idx_dir, time_limit_minutes=3.45 / 60), tmp_path / "b", progress=False)
    first.clock = Clock(0.125)
    assert first.train() == {**result, "step": PROBE_END + 3, "stopped": "time limit", "train_seconds": 3.5}
    resumed = Trainer(budgeted(idx_dir), tmp_path / "b", resume=True, progress=False)
    resumed.clock = Clock(100.0)  # slower now: the count stays the one fixed
    assert resumed.cfg.train.steps == PROBE_END + 5 and resumed.train()["step"] == PROBE_END + 5
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for group in ("model", "ema"):
        for key, value in getattr(a, group).items():
            assert torch.equal(value, getattr(b, group)[key]), f"{group}.{key} differs after resume"


def test_a_budget_shorter_than_the_warm_up_says_so_in_one_line(idx_dir, tmp_path, capsys):
    """30 steps fixed (as above) with 100 warm-up steps: the rate never reaches train.lr, and the run
    says by how much; with the warm-up inside the budget it says nothing."""
    for warmup, said in (
        (
            100,
            "ddpm: the budget holds 30 steps, fewer than train.warmup_steps (100): the "
            "learning rate peaks at 30% of train.lr\n",
        ),
        (2, ""),
    ):
        trainer = Trainer(budgeted(idx_dir, warmup_steps=warmup), tmp_path / f"w{warmup}", progress=False)
        trainer.clock = Clock(0.125)
        assert trainer.train()["step"] == PROBE_END + 5
        assert capsys.readouterr().err == said


def test_a_run_resumed_in_its_probe_goes_on_measuring(idx_dir, tmp_path):
    first = Trainer(budgeted(idx_dir, time_limit_minutes=1.2 / 60), tmp_path / "run", progress=False)
    first.clock = Clock(0.125)
    assert first.train()["step"] == 10
    assert Checkpoint(tmp_path / "run").train_state["budget"] == {"probe_seconds": 0.625, "probe_steps": 5}
    resumed = Trainer(budgeted(idx_dir), tmp_path / "run", resume=True, progress=False)
    resumed.clock = Clock(0.125)
    assert resumed.train()["budget"]["steps"] == PROBE_END + 5


def test_a_budget_is_positive_and_cannot_change_on_resume(idx_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.budget_minutes must be positive, got 0"):
        Trainer(budgeted(idx_dir, budget_minutes=0), tmp_path / "x", progress=False)
    run = Trainer(budgeted(idx_dir, time_limit_minutes=1.2 / 60), tmp_path / "run", progress=False)
    run.clock = Clock(0.125)
    run.train()
    with pytest.raises(ConfigError, match="cannot change train.budget_minutes"):
        Trainer(budgeted(idx_dir, budget_minutes=1.0), tmp_path / "run", resume=True, progress=False)
