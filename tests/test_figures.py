import json

import pytest
import torch
from conftest import gaussian_optimal_eps, tiny_config
from PIL import Image

from ddpm.cli import main
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import ConfigError
from ddpm.figures import denoising_gif, forward_process, interpolate, progressive, shared_latents
from ddpm.samplers import SAMPLERS
from ddpm.schedules import make_betas
from ddpm.train import Trainer


def test_forward_process_columns_follow_q_and_report_snr():
    d = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.full((2, 1, 8, 8), 0.5)
    rows, snr = forward_process(d, x0, [0, 999], torch.Generator().manual_seed(0))
    assert rows[0].shape == (2, 1, 8, 8)
    assert (rows[0][0] - 0.5).abs().max() < 0.05  # t = 0: almost the image
    assert abs(rows[0][1].mean()) < 0.3 and 0.6 < rows[0][1].std() < 1.4  # t = T-1: almost noise
    abar = d.alphas_cumprod
    assert snr == pytest.approx([abar[0] / (1 - abar[0]), abar[999] / (1 - abar[999])])


def test_progressive_ends_at_the_sample_and_its_x0():
    d = GaussianDiffusion(make_betas("linear", 20))
    rows_x, rows_x0 = progressive(
        lambda x, t: torch.zeros_like(x), d, 3, (1, 4, 4), 5, torch.Generator().manual_seed(0), "cpu"
    )
    assert len(rows_x) == 3 and rows_x[0].shape == (5, 1, 4, 4)
    assert torch.equal(rows_x[0][-1], rows_x0[0][-1])  # the last step returns the x0 prediction


def test_progressive_draws_algorithm_2s_chain_by_default():
    d = GaussianDiffusion(make_betas("linear", 20))
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    rows_x, rows_x0 = progressive(model, d, 2, (1, 2, 2), 5, torch.Generator().manual_seed(0), "cpu")
    steps = list(d.p_sample_loop_progressive(model, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0)))
    kept = [s for s in steps if s.t in (19, 14, 10, 5, 0)]
    for i in range(2):
        assert torch.equal(rows_x[i], torch.stack([s.sample[i] for s in kept]))
        assert torch.equal(rows_x0[i], torch.stack([s.pred_x0[i] for s in kept]))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_figure_draws_with_every_sampler(sampler, tmp_path):
    d = GaussianDiffusion(make_betas("linear", 20))
    model = gaussian_optimal_eps(d, 0.3, 0.2)
    g, shape = torch.Generator().manual_seed(0), (1, 4, 4)
    rows_x, rows_x0 = progressive(model, d, 3, shape, 5, g, "cpu", sampler=sampler)
    assert len(rows_x) == 3 and rows_x[0].shape == rows_x0[0].shape == (5, *shape)
    assert torch.equal(rows_x[0][-1], rows_x0[0][-1])  # the last step goes to its x0 prediction
    assert all(torch.isfinite(r).all() for r in rows_x + rows_x0)
    denoising_gif(model, d, 2, shape, 4, g, "cpu", tmp_path / f"{sampler}.gif", sampler=sampler)
    assert Image.open(tmp_path / f"{sampler}.gif").n_frames >= 4
    x0 = torch.full(shape, 0.3)
    rows = shared_latents(model, d, x0, [15, 5], 2, g, "cpu", sampler=sampler)
    assert [r.shape for r in rows] == [(3, *shape)] * 2
    if sampler.startswith("sde-") or sampler == "edm":  # they draw each mixture's own noise
        with pytest.raises(ConfigError, match="the same reverse noise"):
            interpolate(model, d, x0, -x0, [15], [0, 0.5, 1], g, "cpu", sampler=sampler)
    else:
        rows = interpolate(model, d, x0, -x0, [15, 5], [0, 0.5, 1], g, "cpu", sampler=sampler)
        assert [r.shape for r in rows] == [(5, *shape)] * 2 and torch.isfinite(torch.cat(rows)).all()


def test_figures_cli_writes_every_figure(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=1), run, progress=False).train()
    assert main(["figures", str(run), "--num", "3", "--frames", "4", "--seed", "5"]) == 0
    out = run / "figures"
    info = json.loads((out / "figures.json").read_text())
    assert info["seed"] == 5 and len(info["forward"]["snr"]) == 4
    for name in (
        "forward.png",
        "progressive_xt.png",
        "progressive_x0.png",
        "shared_latents.png",
        "interpolation.png",
    ):
        assert Image.open(out / name).size[0] > 8
    gif = Image.open(out / "denoising.gif")
    assert gif.n_frames > 5
    first = (out / "progressive_xt.png").read_bytes()
    assert (
        main(
            [
                "figures",
                str(run),
                "--num",
                "3",
                "--frames",
                "4",
                "--seed",
                "5",
                "--figure",
                "progressive",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again" / "progressive_xt.png").read_bytes() == first  # seeded
    capsys.readouterr()
    assert main(["figures", str(run), "--figure", "fig99"]) == 2
    assert "unknown figure" in capsys.readouterr().err


def test_figures_of_a_class_conditional_run_take_a_class(class_run, tmp_path, capsys):
    from ddpm.data import load_idx_dataset

    run, data = class_run
    labels = load_idx_dataset("fashion-mnist", str(data), "test", kind="labels")
    common = int(labels.mode().values)  # a class with at least 2 test images
    assert (labels == common).sum() >= 2
    flags = ["--num", "3", "--frames", "3", "--figure", "progressive", "--figure", "shared", "--no-ema"]
    for name, extra in (("null", []), ("class", ["--class", str(common), "--guidance", "3"])):
        assert main(["figures", str(run), *flags, *extra, "--out", str(tmp_path / name)]) == 0
    info = json.loads((tmp_path / "class" / "figures.json").read_text())
    assert info["class"] == common and info["guidance"] == 3.0
    null, guided = ((tmp_path / n / "progressive_xt.png").read_bytes() for n in ("null", "class"))
    assert null != guided  # same seed: the class changed the chain
    capsys.readouterr()
    assert main(["figures", str(run), *flags, "--guidance", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--guidance needs --class" in capsys.readouterr().err
    absent = next(c for c in range(10) if (labels == c).sum() < 2)
    assert main(["figures", str(run), *flags, "--class", str(absent), "--out", str(tmp_path / "y")]) == 2
    assert "fewer than 2 images of class" in capsys.readouterr().err


def test_figures_take_the_speed_options_of_sample(class_run, tmp_path, wrap_calls):
    """--channels-last, --compile and --compile-mode reach the network (through wrap_network) and
    figures.json, as `ddpm sample`'s do; on a CPU, channels_last draws what the default layout draws."""
    import numpy as np

    run, data = class_run
    seen = wrap_calls
    flags = ["--num", "2", "--frames", "3", "--figure", "progressive", "--figure", "shared"]
    flags += ["--data-dir", str(data), "--device", "cpu"]
    assert main(["figures", str(run), *flags, "--out", str(tmp_path / "plain")]) == 0
    assert seen == [(torch.device("cpu"), "fp32", False, False, "default")]
    speed = ["--channels-last", "--compile", "--compile-mode", "max-autotune-no-cudagraphs"]
    assert main(["figures", str(run), *flags, *speed, "--out", str(tmp_path / "fast")]) == 0
    assert seen[1:] == [(torch.device("cpu"), "fp32", True, True, "max-autotune-no-cudagraphs")]
    fast = json.loads((tmp_path / "fast" / "figures.json").read_text())
    assert fast["channels_last"] is True and fast["compile"] == "max-autotune-no-cudagraphs"
    for name in ("progressive_xt.png", "progressive_x0.png", "shared_latents.png"):
        a, b = (np.asarray(Image.open(tmp_path / n / name)).astype(int) for n in ("plain", "fast"))
        difference = np.abs(a - b)  # float rounding may move a pixel by one 8-bit level
        assert difference.max() <= 1 and (difference > 0).mean() < 0.02, name


def test_figures_cli_draws_with_the_sampler_asked_for(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=1), run, progress=False).train()
    args = [
        "figures",
        str(run),
        "--num",
        "3",
        "--frames",
        "4",
        "--figure",
        "progressive",
        "--sampler",
        "ddim",
    ]
    assert main([*args, "--out", str(tmp_path / "ddim")]) == 0
    assert json.loads((tmp_path / "ddim" / "figures.json").read_text())["sampler"] == "ddim"
    assert main([*args[:-1], "ancestral", "--out", str(tmp_path / "ancestral")]) == 0
    a, b = (Image.open(tmp_path / n / "progressive_x0.png") for n in ("ddim", "ancestral"))
    assert a.size == b.size and a.tobytes() != b.tobytes()  # another reverse process, other pictures
    capsys.readouterr()
    bad = ["figures", str(run), "--sampler", "sde-dpm++2m", "--out", str(tmp_path / "sde")]
    assert main(bad) == 2 and "interpolation gives every mixture" in capsys.readouterr().err
    assert not (tmp_path / "sde").exists()
