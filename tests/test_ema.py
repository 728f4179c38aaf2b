"""train.ema_width: EDM2's power-function EMA (Karras et al. 2024, Section 3.1, Appendix C.1/C.2) in place
of the constant train.ema_decay, which stays exactly as it was when ema_width is None."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpm.checkpoint import Checkpoint
from ddpm.config import MAX_EMA_WIDTH
from ddpm.train import EMA, Trainer, power_ema_exponent


def published_width(gamma: float) -> float:
    """sigma_rel of the power profile of exponent gamma (EDM2, eq. 3 / Appendix C.2)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@pytest.mark.parametrize(("width", "gamma"), [(0.05, 16.97), (0.10, 6.94)])
def test_the_exponent_solves_the_published_relation(width, gamma):
    g = power_ema_exponent(width)
    assert g == pytest.approx(gamma, abs=0.005)  # the paper's sigma_rel 0.05 and 0.10
    assert published_width(g) == pytest.approx(width, rel=1e-13)
    # EDM2's own std_to_exp: the largest real root of the cubic
    roots = np.roots([1, 7, 16 - width**-2, 12 - width**-2])
    assert g == pytest.approx(roots.real.max(), rel=1e-12)


def test_the_exponent_over_the_whole_range_of_widths():
    for width in (1e-4, 0.01, 0.2, 0.28, MAX_EMA_WIDTH * (1 - 1e-6)):
        g = power_ema_exponent(width)
        assert g > 0 and published_width(g) == pytest.approx(width, rel=1e-12)
    assert power_ema_exponent(0.05) > power_ema_exponent(0.1)  # narrower: more weight on recent steps
    for bad in (0.0, -0.1, MAX_EMA_WIDTH, 1.0):
        with pytest.raises(ValueError, match="width must be in"):
            power_ema_exponent(bad)


class Scalar(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(0.25, dtype=dtype))


def power_ema_run(width: float, xs: list[float], dtype=torch.float64) -> list[float]:
    """The EMA after each of the optimiser updates that set the parameter to xs[0], xs[1], ..."""
    model = Scalar(dtype)
    ema = EMA(model, decay=0.9999, width=width)  # (decay unused with a width)
    out = []
    for step, x in enumerate(xs, start=1):
        with torch.no_grad():
            model.p.fill_(x)
        ema.update(model, step=step)
        out.append(ema.shadow["p"].item())
    return out


@pytest.mark.parametrize("width", [0.05, 0.10])
def test_the_power_ema_is_its_closed_form_and_near_the_i_to_the_gamma_average(width):
    """beta_t = (1 - 1/t)^(gamma+1) gives beta_{i+1} ... beta_t = (i/t)^(gamma+1), so after step t the EMA
    is exactly sum_i ((i/t)^(gamma+1) - ((i-1)/t)^(gamma+1)) x_i: the continuous profile
    (gamma+1) s^gamma / t^(gamma+1) over the weights held at x_i on (i-1, i]."""
    g = power_ema_exponent(width)
    T = 300
    xs = [math.cos(i / 7) + i / T for i in range(1, T + 1)]  # neither monotone nor constant
    ema = power_ema_run(width, xs)
    assert ema[0] == xs[0]  # beta_1 = 0: the first update copies the weights, bit for bit
    x = np.array(xs)
    for t in (1, 2, 3, 10, 57, 100, T):
        i = np.arange(1, t + 1, dtype=np.float64)
        exact = (i / t) ** (g + 1) - ((i - 1) / t) ** (g + 1)  # the recursion's weights, summing to 1
        assert math.fsum(exact) == pytest.approx(1.0, abs=1e-15)
        # float64 throughout: each of the t lerps rounds by a few eps and the later ones only shrink
        # earlier errors (weights in [0, 1]), so the recursion is within ~3 t eps (2e-13 at t=300) of
        # the closed form, itself summed to ~t eps: 1e-12 leaves room and catches any wrong beta.
        assert ema[t - 1] == pytest.approx(math.fsum(exact * x[:t]), abs=1e-12)
        # EDM2's i^gamma-weighted average: with u_i = (gamma+1) i^gamma / t^(gamma+1), both weightings
        # lie below u (the integral of s^gamma over (i-1, i] is at most i^gamma, and sum i^gamma is at
        # least t^(gamma+1)/(gamma+1)), and sum u <= 1 + (gamma+1)/t (sum i^gamma <= t^(gamma+1)/(gamma+1)
        # + t^gamma), so their total variation distance is at most (gamma+1)/t and the two averages
        # differ by at most (gamma+1)/t times the range of x.
        powered = i**g / math.fsum(i**g)
        bound = (g + 1) / t * (x[:t].max() - x[:t].min())
        assert abs(ema[t - 1] - math.fsum(powered * x[:t])) <= bound + 1e-12
    # the bound is O(1/t); here the averages are in fact much closer
    i = np.arange(1, T + 1, dtype=np.float64)
    assert abs(ema[-1] - math.fsum(i**g / math.fsum(i**g) * x)) < 0.1 * (g + 1) / T


def test_the_power_ema_in_float32_follows_the_closed_form():
    """The trainer's weights are float32: lerp's weight rounds to float32 too, the error stays at a few
    float32 eps (1.2e-7) per step, shrunk by the later steps, as above."""
    g, T = power_ema_exponent(0.1), 200
    xs = [float(np.float32(math.sin(i / 5))) for i in range(1, T + 1)]
    ema = power_ema_run(0.1, xs, torch.float32)
    assert ema[0] == xs[0]
    i = np.arange(1, T + 1, dtype=np.float64)
    exact = (i / T) ** (g + 1) - ((i - 1) / T) ** (g + 1)
    assert ema[-1] == pytest.approx(math.fsum(exact * np.array(xs)), abs=T * 4 * 2**-24)


def test_the_power_ema_needs_the_step_and_forgets_the_constant_decay():
    ema = EMA(Scalar(), decay=0.5, width=0.1)
    with pytest.raises(ValueError, match="needs the optimiser step"):
        ema.update(Scalar())
    g = power_ema_exponent(0.1)
    assert ema.decay_at(1) == 0.0 and ema.decay_at(4) == 0.75 ** (g + 1)


def test_without_a_width_the_ema_is_the_constant_decay_lerp_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.999)
    assert ema.width is None and ema.exponent is None
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].num_batches_tracked += 1
        assert ema.decay_at(step) == 0.999
        if step % 3:
            ema.update(model, step=step if step % 2 else None)  # the step changes nothing here
        else:  # the deferred path's weight: a 0-dim tensor
            ema.update(model, weight=(1.0 - ema.decay) * (1.0 - torch.zeros(())))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                w = 1.0 - 0.999 if step % 3 else (1.0 - 0.999) * (1.0 - torch.zeros(()))
                expected[name] = expected[name].lerp(value, w)
            else:
                expected[name] = value.clone()
            assert torch.equal(ema.shadow[name], expected[name]), (step, name)


def ema_config(idx_dir, **train):
    return tiny_config(idx_dir, ema_width=0.1, **train)


def test_a_power_ema_run_resumes_bit_for_bit(idx_dir, tmp_path):
    straight = Trainer(ema_config(idx_dir, steps=12), tmp_path / "a", progress=False)
    assert straight.ema.exponent == power_ema_exponent(0.1)
    straight.train()
    first = Trainer(ema_config(idx_dir, steps=5), tmp_path / "b", progress=False)
    first.train()
    del first
    resumed = Trainer(ema_config(idx_dir, steps=12), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 5
    resumed.train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for group in ("model", "ema"):
        ta, tb = getattr(a, group), getattr(b, group)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), group
    assert a.config["train"]["ema_width"] == 0.1  # recorded with the run
    # the option is in effect: the constant train.ema_decay=0.9 gives other EMA weights
    Trainer(tiny_config(idx_dir, steps=12), tmp_path / "c", progress=False).train()
    c = Checkpoint(tmp_path / "c")
    assert not all(torch.equal(a.ema[k], c.ema[k]) for k in a.ema if a.ema[k].is_floating_point())


def test_the_power_ema_starts_as_the_weights_after_the_first_update(idx_dir, tmp_path):
    trainer = Trainer(ema_config(idx_dir, warmup_steps=0), tmp_path / "run", progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    changed = False
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(trainer.ema.shadow[name], value), name
        changed |= not torch.equal(value, initial[name])
    assert changed


def nan_at_step_4(trainer: Trainer) -> Trainer:
    network = trainer.network
    trainer.network = lambda x, t: network(x, t) * (float("nan") if trainer.step == 3 else 1.0)
    return trainer


def test_a_skipped_step_moves_the_power_ema_by_zero_checked_now_or_deferred(idx_dir, tmp_path):
    emas = {}
    for deferred in (False, True):
        cfg = ema_config(idx_dir, steps=6, log_every=3, on_nonfinite="skip", fused_optimizer=True)
        cfg.train.deferred_checks = deferred
        trainer = nan_at_step_4(Trainer(cfg, tmp_path / str(deferred), progress=False))
        for _ in range(3):
            trainer.train_step()
        before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
        trainer.train_step()  # step 4: non-finite, skipped (deferred: on the device, found later)
        assert all(torch.equal(trainer.ema.shadow[k], before[k]) for k in before)
        assert trainer.train()["skipped_steps"] == 1
        emas[deferred] = Checkpoint(tmp_path / str(deferred)).ema
    assert all(torch.equal(emas[False][k], emas[True][k]) for k in emas[False])


# ---- train.ema_widths: EMAs kept beside the run's, to choose the width after training ----


def test_kept_widths_are_the_emas_of_runs_with_that_width_and_resume_bit_for_bit(idx_dir, tmp_path):
    """Each kept EMA is, bit for bit, the EMA a run with ema_width = that width would have (the EMA never
    changes the training), through a resume too."""
    for steps, resume in ((5, False), (12, True)):
        kept = ema_config(idx_dir, steps=steps)
        kept.train.ema_widths = (0.05, 0.2)
        Trainer(kept, tmp_path / "kept", resume=resume, progress=False).train()
    ckpt = Checkpoint(tmp_path / "kept")
    assert list(ckpt.kept_emas) == [0.05, 0.2]
    for width in (0.05, 0.2):
        alone = ema_config(idx_dir, steps=12)
        alone.train.ema_width = width
        Trainer(alone, tmp_path / f"alone-{width}", progress=False).train()
        theirs = Checkpoint(tmp_path / f"alone-{width}").ema
        mine = ckpt.weights(ema_width=width)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the run's own EMA (width 0.1) is still its EMA, and differs from the kept ones
    assert not all(torch.equal(ckpt.ema[k], ckpt.kept_emas[0.05][k]) for k in ckpt.ema)


def test_a_kept_width_is_sampled_by_name_and_a_missing_one_is_one_line(idx_dir, tmp_path, capsys):
    from ddpm.build import load_network
    from ddpm.cli import main
    from ddpm.errors import CheckpointError, ConfigError
    from ddpm.sample import sample_to_dir

    cfg = ema_config(idx_dir, steps=3)
    cfg.train.ema_widths = (0.05,)
    run = tmp_path / "run"
    Trainer(cfg, run, progress=False).train()
    loaded = load_network(run, "ema", ema_width=0.05)
    kept = Checkpoint(run).kept_emas[0.05]
    assert all(torch.equal(v, kept[k]) for k, v in loaded.model.state_dict().items())
    opts = dict(num=2, batch_size=2, steps=3, sampler="ddim", progress=False)
    record = sample_to_dir(run, tmp_path / "a", ema_width=0.05, **opts)
    assert record["ema_width"] == 0.05 and record["weights"] == "ema"
    with pytest.raises(CheckpointError, match="has no ema_width 0.07; it keeps: 0.05$") as e:
        sample_to_dir(run, tmp_path / "b", ema_width=0.07, **opts)
    assert e.value.field == "ema_width"
    with pytest.raises(ConfigError, match="^ema_width chooses a kept EMA: not the raw weights$"):
        sample_to_dir(run, tmp_path / "b", ema_width=0.05, use_ema=False, **opts)
    argv = ["sample", str(run), "--num", "2", "--steps", "3", "--out", str(tmp_path / "c"), "--no-progress"]
    assert main([*argv, "--ema-width", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no --ema-width 0.3; it keeps: 0.05" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("widths", "message"),
    [((0.05, 0.05), "must differ from each other"), ((0.05, 0.3), r"must be in \(0, 0.2887\), got 0.3")],
)
def test_bad_kept_widths_are_refused(widths, message):
    from ddpm.config import validate
    from ddpm.errors import ConfigError

    cfg = tiny_config("data")
    cfg.train.ema_widths = widths
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
