"""The super-resolution stage of a cascade: its condition (upsampled, noise-augmented low-resolution
image and level), its U-Net, its training batches and its sampling."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import count_parameters, linear, tiny_config

from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.conditioning.low_res import LowResImage, downsample, low_res_condition
from ddpm.config import DataConfig
from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.images import load_samples, save_npz, to_model_range
from ddpm.rng import step_generator
from ddpm.train import Trainer
from ddpm.unet import UNet


def sr_config(data_dir, **train):
    cfg = tiny_config(data_dir, **train)
    cfg.model.low_res, cfg.model.low_res_noise_max, cfg.model.low_res_noise = 4, 20, 5
    return cfg


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    from conftest import make_idx_dir

    base = tmp_path_factory.mktemp("sr-run")
    data = make_idx_dir(base / "idx")
    Trainer(sr_config(data, steps=6), base / "run", progress=False).train()
    return base / "run", data


def test_the_condition_is_the_upsampled_image_noised_like_x_of_the_level_before():
    d = linear(100)
    low = torch.rand(5, 1, 4, 4) * 2 - 1
    noise = torch.randn(5, 1, 8, 8)
    level = torch.tensor([0, 1, 7, 50, 99])
    cond = low_res_condition(low, 8, level, noise, d.np["alphas_cumprod"])
    up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(cond.image[0], up[0])  # level 0: clean
    expected = d.q_sample(up[1:], level[1:] - 1, noise[1:])
    assert torch.allclose(cond.image[1:], expected, atol=1e-5)
    assert torch.equal(cond.level, level)


def test_downsampling_makes_the_data_a_base_model_at_that_size_trains_on(idx_dir):
    full = load_dataset(DataConfig(dataset="fashion-mnist", root=str(idx_dir), image_size=8)).data
    small = load_dataset(DataConfig(dataset="fashion-mnist", root=str(idx_dir), image_size=4)).data
    assert torch.equal(downsample(full, 4), small)


def test_the_unet_reads_the_low_res_image_and_its_level():
    kwargs = dict(in_channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4)
    torch.manual_seed(0)
    plain = UNet(**kwargs)
    torch.manual_seed(0)
    sr = UNet(**kwargs, low_res_channels=1).eval()
    # the extra input channel's weights and the level embedding (two linears of 4 * ch)
    temb = 4 * 8
    extra = 8 * 9 + (8 * temb + temb) + (temb * temb + temb)
    assert count_parameters(sr) == count_parameters(plain) + extra
    for module in (sr.conv_in, sr.level_embed[2]):  # let the condition reach the output visibly
        torch.nn.init.normal_(module.weight, std=0.5)
    torch.nn.init.normal_(sr.conv_out.weight, std=0.5)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    image = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = sr(x, t, LowResImage(image, torch.tensor([0, 0])))
        assert not torch.allclose(out, sr(x, t, LowResImage(image * 0, torch.tensor([0, 0]))))
        assert not torch.allclose(out, sr(x, t, LowResImage(image, torch.tensor([9, 9]))))
    with pytest.raises(ValueError, match="super-resolution"):
        sr(x, t)
    with pytest.raises(ValueError, match="low-resolution condition"):
        sr(x, t, LowResImage(torch.randn(2, 1, 4, 4), torch.tensor([0, 0])))


def test_a_training_batch_carries_the_noised_low_res_image_of_its_own_examples(idx_dir, tmp_path):
    trainer = Trainer(sr_config(idx_dir), tmp_path / "run", progress=False)
    step = 3
    batch = trainer.task.batch(step, step_generator(0, step))
    x, y = batch.x, batch.cond
    # the same draws, in the trainer's order: flips, t, noise, then the levels and the augmentation noise
    g = step_generator(0, step)
    flip = torch.rand(4, generator=g) < 0.5
    torch.randint(0, 50, (4,), generator=g), torch.randn((4, 1, 8, 8), generator=g)
    level = torch.randint(0, 20, (4,), generator=g)
    augmentation = torch.randn((4, 1, 8, 8), generator=g)
    examples = trainer.task.examples
    images = examples.data[examples.indices(step)]
    low = to_model_range(downsample(images, 4))
    low = torch.where(flip[:, None, None, None], low.flip(3), low)
    expected = low_res_condition(low, 8, level, augmentation, trainer.task.diffusion.np["alphas_cumprod"])
    assert torch.equal(y.level, level) and torch.equal(y.image, expected.image)
    # and x0 is those images at full size, flipped alike: the pair matches
    assert torch.equal(
        downsample(((x + 1) * 127.5).round().to(torch.uint8), 4), ((low + 1) * 127.5).round().to(torch.uint8)
    )


def test_resume_is_bit_exact(idx_dir, tmp_path):
    Trainer(sr_config(idx_dir, steps=8), tmp_path / "a", progress=False).train()
    Trainer(sr_config(idx_dir, steps=3), tmp_path / "b", progress=False).train()
    Trainer(sr_config(idx_dir, steps=8), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for key in a.ema:
        assert torch.equal(a.ema[key], b.ema[key]), key


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(low_res=8), "model.low_res must be in 1..7"),
        (dict(low_res_noise_max=52), "low_res_noise_max must be in 1..51"),
        (dict(low_res_noise=51), "low_res_noise must be in 0..50"),
        (dict(num_classes=3), "super-resolution stage"),
        (dict(labels="classes"), "super-resolution stage"),
    ],
)
def test_bad_stage_configs_are_refused(idx_dir, tmp_path, change, message):
    cfg = sr_config(idx_dir)
    for key, value in change.items():
        setattr(cfg.data if key == "labels" else cfg.model, key, value)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_sample_upsamples_the_given_images(sr_run, tmp_path, capsys):
    run, data = sr_run
    real = load_dataset(DataConfig(dataset="fashion-mnist", root=str(data), image_size=8, split="test")).data
    save_npz(downsample(real, 4), tmp_path / "low.npz")
    args = ["sample", str(run), "--num", "6", "--steps", "5", "--no-progress", "--low-res-noise", "0"]
    assert main([*args, "--low-res", str(tmp_path / "low.npz"), "--out", str(tmp_path / "a")]) == 0
    # full-size images are downsampled first, to the same conditions and the same samples
    save_npz(real, tmp_path / "full.npz")
    assert main([*args, "--low-res", str(tmp_path / "full.npz"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_samples(tmp_path / "a"), load_samples(tmp_path / "b")
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b)
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["low_res_size"] == 4 and info["low_res_noise"] == 0
    # the stage's default level, and another seed, give other samples
    assert main([*args[:-2], "--low-res", str(tmp_path / "low.npz"), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "samples.json").read_text())["low_res_noise"] == 5
    assert not torch.equal(load_samples(tmp_path / "c"), a)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --low-res"),
        (["--low-res", "LOW", "--num", "20"], "holds 10 images; 20"),
        (["--low-res", "TINY"], "2x2 for a stage that upsamples 4x4"),
        (["--low-res", "LOW", "--low-res-noise", "99"], "noise level must be in 0..50"),
        (["--low-res", "LOW", "--guidance", "2"], "not a class or prompt"),
    ],
)
def test_sample_refuses_bad_low_res_input(sr_run, tmp_path, capsys, extra, message):
    run, _ = sr_run
    save_npz(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), tmp_path / "low.npz")
    save_npz(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), tmp_path / "tiny.npz")
    paths = {"LOW": str(tmp_path / "low.npz"), "TINY": str(tmp_path / "tiny.npz")}
    extra = [paths.get(a, a) for a in extra]
    assert (
        main(["sample", str(run), "--out", str(tmp_path / "s"), "--no-progress", "--num", "8", *extra]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_low_res_flags_need_a_stage(class_run, tmp_path, capsys):
    run, _ = class_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["sample", str(copy), "--low-res", "x.npz", "--out", str(tmp_path / "s")]) == 2
    assert "need a super-resolution stage" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval", "nll"], ["invert", "--steps", "5"], ["figures"]])
def test_commands_that_take_no_low_res_images_refuse_a_stage_in_one_line(sr_run, tmp_path, capsys, command):
    run, data = sr_run
    out = ["--out", str(tmp_path / "out")] if command[0] != "eval" else []
    assert main([*command, str(run), "--data-dir", str(data), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "super-resolution stage" in err, err
    assert not (tmp_path / "out").exists()
