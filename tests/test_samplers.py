import pytest
import torch
from test_diffusion import gaussian_optimal_eps

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.samplers import ddim_sample_loop, timestep_subset
from ddpm.schedules import make_betas


def test_spacings():
    assert timestep_subset(1000, 10, "leading") == list(range(0, 1000, 100))
    assert timestep_subset(1000, 10, "trailing") == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    lin = timestep_subset(1000, 10, "linspace")
    assert lin[0] == 0 and lin[-1] == 999 and len(lin) == 10
    with pytest.raises(ConfigError):
        timestep_subset(1000, 10, "cosine")
    with pytest.raises(ConfigError):
        timestep_subset(1000, 0)


def test_ddim_with_eta_one_on_all_steps_is_ancestral_fixed_small():
    d = GaussianDiffusion(make_betas("linear", 50), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.2, 0.3)
    ancestral = d.p_sample_loop(model, (64, 1), generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample_loop(d, model, (64, 1), eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim, ancestral, rtol=1e-4, atol=1e-5)


def test_ddim_step_matches_diffusers():
    """One DDIM step on 'leading' spacing (where diffusers' prev_t is the next kept step) equals
    DDIMScheduler.step with eta = 0 and eta = 0.5 given the same eps and noise."""
    from diffusers import DDIMScheduler

    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    chain = d.respaced(timestep_subset(1000, 10, "leading"))
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True)
    sched.set_timesteps(10)
    assert sorted(sched.timesteps.tolist()) == chain.timestep_map.tolist()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for eta in (0.0, 0.5):
        for index, t in ((9, 900), (4, 400)):
            ours = ddim_sample_loop_one_step(chain, eps, x, index, eta)
            theirs = sched.step(
                eps, t, x, eta=eta, use_clipped_model_output=True, generator=torch.Generator().manual_seed(5)
            ).prev_sample
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def ddim_sample_loop_one_step(chain, eps, x, index, eta):
    """Our DDIM update for the single step from respaced index ``index`` (noise seeded as diffusers')."""
    sub = GaussianDiffusion(
        chain.betas[: index + 1], var_type="fixedsmall", timestep_map=chain.timestep_map[: index + 1]
    )
    g = torch.Generator().manual_seed(5)
    calls = []

    def model(x_, t_):
        calls.append(int(t_[0]))
        if len(calls) > 1:  # stop after one step: hand the result back through an exception
            raise StopIteration(x_)
        return eps

    try:
        ddim_sample_loop(sub, model, tuple(x.shape), eta=eta, generator=g, x_start=x)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("expected more than one step")


def test_deterministic_ddim_recovers_the_toy_gaussian():
    """eta = 0 integrates the probability-flow ODE: exact in the limit of many steps, and on few steps it
    under-disperses (0.177 at 50 steps, 0.1945 at 200, 0.1994 at 1000 for a true 0.2)."""
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall")
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    spreads = []
    for steps in (50, 1000):
        chain = d.respaced(timestep_subset(1000, steps))
        g = torch.Generator().manual_seed(0)
        x = ddim_sample_loop(chain, model, (20_000, 1), eta=0.0, generator=g, clip_denoised=False)
        assert x.mean().item() == pytest.approx(0.3, abs=0.01)
        spreads.append(x.std().item())
    assert 0.16 < spreads[0] < spreads[1]
    assert spreads[1] == pytest.approx(0.2, rel=0.02)


def test_sample_cli_with_ddim(idx_dir, tmp_path):
    import json

    import numpy as np
    from conftest import tiny_config

    from ddpm.cli import main
    from ddpm.train import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    outs = []
    for name, seed in (("a", "0"), ("b", "0")):
        argv = [
            "sample",
            str(run),
            "--num",
            "3",
            "--steps",
            "5",
            "--sampler",
            "ddim",
            "--spacing",
            "trailing",
            "--seed",
            seed,
            "--out",
            str(tmp_path / name),
            "--no-progress",
        ]
        assert main(argv) == 0
        outs.append(np.load(tmp_path / name / "samples.npz")["arr_0"])
    assert np.array_equal(outs[0], outs[1])
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["sampler"] == "ddim" and info["eta"] == 0.0 and info["spacing"] == "trailing"
    assert main(["sample", str(run), "--sampler", "ddim", "--eta", "-1", "--out", str(tmp_path / "c")]) == 2
