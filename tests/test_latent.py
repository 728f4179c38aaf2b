"""Latent diffusion: the frozen autoencoder behind one interface (ours and a tiny random diffusers
AutoencoderKL), the dataset's latents drawn per step, sampling that decodes, the reconstruction report,
and latent pipelines."""

import json
import shutil

import pytest
import torch
from conftest import make_idx_dir, tiny_config

import ddpm
from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.config import DataConfig, with_kind
from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.images import load_samples, to_model_range, to_uint8
from ddpm.latent import evaluate_reconstructions, load_autoencoder
from ddpm.rng import step_generator
from ddpm.train import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An autoencoder (8x8 -> 2x4x4) and a latent diffusion run on it."""
    base = tmp_path_factory.mktemp("latent")
    data = make_idx_dir(base / "idx")
    cfg = tiny_config(data, steps=20)
    cfg.model = with_kind(cfg.model, "autoencoder")
    cfg.model.latent_channels = 2
    Trainer(cfg, base / "ae", progress=False).train()
    cfg = tiny_config(data, steps=3)
    cfg.model.autoencoder = str(base / "ae")
    Trainer(cfg, base / "latent", progress=False).train()
    return base, data


def tiny_diffusers_autoencoder(path, latent_channels=2):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=8,
        scaling_factor=0.5,
    ).save_pretrained(path)
    return path


def test_our_autoencoder_loads_with_its_recorded_scale(runs):
    base, _ = runs
    ae = load_autoencoder(base / "ae")
    assert ae.scale == Checkpoint(base / "ae").train_state["latent_scale"]
    assert (ae.factor, ae.latent_channels, ae.channels) == (2, 2, 1)
    with pytest.raises(ConfigError, match="not an autoencoder run"):
        load_autoencoder(base / "latent")


def test_a_diffusers_autoencoder_works_through_the_same_interface(tmp_path):
    from diffusers import AutoencoderKL

    path = tiny_diffusers_autoencoder(tmp_path / "vae")
    ae = load_autoencoder(path)
    assert (ae.scale, ae.factor, ae.latent_channels, ae.channels) == (0.5, 2, 2, 1)
    reference = AutoencoderKL.from_pretrained(str(path)).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, logvar = ae.encode(x)
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        assert torch.allclose(mean, dist.mean) and torch.allclose(logvar, dist.logvar)
        assert torch.allclose(ae.decode(mean), reference.decode(dist.mean).sample)


def test_a_step_draws_scaled_latents_from_each_images_posterior(runs, tmp_path):
    base, data = runs
    cfg = tiny_config(data, steps=3)
    cfg.model.autoencoder = str(base / "ae")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.task.example_shape == (2, 4, 4) and trainer.cfg.model.latent_size == 4
    assert cfg.model.latent_size == 0  # resolved into the run's config, not into the caller's
    step = 2
    x = trainer.task.batch(step, step_generator(0, step)).x
    g = step_generator(0, step)  # the trainer's draws: flips, t, noise, then the latents' noise
    flip = torch.rand(4, generator=g) < 0.5
    torch.randint(0, 50, (4,), generator=g), torch.randn((4, 2, 4, 4), generator=g)
    eps = torch.randn((4, 2, 4, 4), generator=g)
    ae = load_autoencoder(base / "ae")
    examples = trainer.task.examples
    images = to_model_range(examples.data[examples.indices(step)])
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    mean, logvar = ae.encode(images)
    assert torch.allclose(x, (mean + torch.exp(0.5 * logvar) * eps) * ae.scale, atol=1e-5)


def test_sampling_decodes_unclipped_latents(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "s"
    assert (
        main(
            ["sample", str(base / "latent"), "--num", "4", "--steps", "5", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    info = json.loads((out / "samples.json").read_text())
    assert info["clip_denoised"] is False and info["autoencoder"]["kind"] == "ddpm"
    images = load_samples(out)
    assert images.shape == (4, 1, 8, 8)
    # the same as decoding generate's latents by hand
    model, diffusion, cfg = ddpm.load_model(base / "latent")
    latents = ddpm.generate(model, diffusion, 4, (2, 4, 4), steps=5, clip_denoised=False)
    ae = load_autoencoder(base / "ae")
    assert torch.equal(images, to_uint8(ae.decode(latents / ae.scale).clamp(-1, 1)))
    assert main(["figures", str(base / "latent"), "--out", str(tmp_path / "f")]) == 2


def test_the_reconstruction_report_is_measured_on_the_split(runs, tmp_path):
    base, data = runs
    report = evaluate_reconstructions(base / "ae", num=6, cache_dir=tmp_path / "c", progress=False)
    images = load_dataset(
        DataConfig(dataset="fashion-mnist", root=str(data), image_size=8, split="test")
    ).data[:6]
    ae = load_autoencoder(base / "ae")
    reconstructions = to_uint8(ae.decode(ae.encode(to_model_range(images))[0]).clamp(-1, 1))
    expected = (reconstructions.float() - images.float()).abs().mean().item()
    assert report["mean_absolute_error"] == pytest.approx(expected, abs=1e-3)
    assert report["num_images"] == 6 and report["reconstruction_domain_fid"] >= 0


def test_latent_pipelines_decode_with_their_decoder_and_check_it(runs, tmp_path, capsys):
    base, _ = runs
    pipe = tmp_path / "pipe"
    assert (
        main(["pipeline", str(pipe), "--generator", str(base / "latent"), "--decoder", str(base / "ae")]) == 0
    )
    spec = json.loads((pipe / "pipeline.json").read_text())
    assert spec["parts"][-1]["kind"] == "latent"
    args = ["--num", "4", "--steps", "5", "--sampler", "ancestral", "--no-progress"]
    assert main(["generate", str(pipe), *args, "--out", str(tmp_path / "g")]) == 0
    assert main(["sample", str(base / "latent"), *args, "--out", str(tmp_path / "s")]) == 0
    assert torch.equal(load_samples(tmp_path / "g"), load_samples(tmp_path / "s"))
    assert not (tmp_path / "g" / "low-res-grid.png").exists()
    # a decoder for other latent channels is refused, naming it
    vae = tiny_diffusers_autoencoder(tmp_path / "vae3", latent_channels=3)
    capsys.readouterr()
    assert (
        main(["pipeline", str(tmp_path / "p3"), "--generator", str(base / "latent"), "--decoder", str(vae)])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "decodes 3-channel latents; the generator makes 2-channel ones" in err
        and not (tmp_path / "p3").exists()
    )
    # an autoencoder is no generator
    code = main(
        ["pipeline", str(tmp_path / "p4"), "--generator", str(base / "ae"), "--decoder", str(base / "ae")]
    )
    assert code == 2 and "is an autoencoder, not a diffusion run" in capsys.readouterr().err
    # a diffusers decoder of the same latent space can replace ours
    vae2 = tiny_diffusers_autoencoder(tmp_path / "vae2")
    assert (
        main(["pipeline", str(tmp_path / "p2"), "--generator", str(base / "latent"), "--decoder", str(vae2)])
        == 0
    )
    assert main(["generate", str(tmp_path / "p2"), *args, "--out", str(tmp_path / "g2")]) == 0
    assert load_samples(tmp_path / "g2").shape == (4, 1, 8, 8)


def test_a_latent_run_keeps_its_autoencoder_and_samples_without_the_original(runs, tmp_path, capsys):
    base, data = runs
    shutil.copytree(base / "ae", tmp_path / "ae")
    cfg = tiny_config(data, steps=2)
    cfg.model.autoencoder = str(tmp_path / "ae")
    Trainer(cfg, tmp_path / "latent", progress=False).train()
    copy = tmp_path / "latent" / "autoencoder"
    assert sorted(p.name for p in copy.iterdir()) == ["checkpoint.safetensors", "config.json"]
    args = ["--num", "4", "--steps", "3", "--sampler", "ancestral", "--no-progress"]
    assert main(["sample", str(tmp_path / "latent"), *args, "--out", str(tmp_path / "before")]) == 0
    shutil.rmtree(tmp_path / "ae")  # the original is gone: the run's copy samples, the same images
    assert main(["sample", str(tmp_path / "latent"), *args, "--out", str(tmp_path / "after")]) == 0
    assert torch.equal(load_samples(tmp_path / "before"), load_samples(tmp_path / "after"))
    record = json.loads((tmp_path / "after" / "samples.json").read_text())["autoencoder"]
    assert record["path"] == str(copy)
    # a pipeline of a latent generator takes that copy as its decoder unless told otherwise
    assert main(["pipeline", str(tmp_path / "pipe"), "--generator", str(tmp_path / "latent")]) == 0
    spec = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert spec["parts"][-1]["kind"] == "latent" and spec["parts"][-1]["path"].endswith("latent/autoencoder")
    assert main(["generate", str(tmp_path / "pipe"), *args, "--out", str(tmp_path / "g")]) == 0
    assert torch.equal(load_samples(tmp_path / "g"), load_samples(tmp_path / "after"))
    # a pixel generator has no decoder of its own
    Trainer(tiny_config(data, steps=2), tmp_path / "pixel", progress=False).train()
    capsys.readouterr()
    assert main(["pipeline", str(tmp_path / "p2"), "--generator", str(tmp_path / "pixel")]) == 2
    assert "name one (--decoder)" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_a_latent_run_on_a_diffusers_autoencoder_copies_its_folder(runs, tmp_path):
    _, data = runs
    vae = tiny_diffusers_autoencoder(tmp_path / "vae")
    cfg = tiny_config(data, steps=1)
    cfg.model.autoencoder = str(vae)
    Trainer(cfg, tmp_path / "latent", progress=False).train()
    copied = sorted(p.name for p in (tmp_path / "latent" / "autoencoder").iterdir())
    assert copied == sorted(p.name for p in vae.iterdir() if p.is_file())


def test_a_unet_too_deep_for_the_latents_is_refused_once_their_size_is_known(runs, tmp_path):
    base, data = runs
    cfg = tiny_config(data, steps=1)
    cfg.model.autoencoder, cfg.model.ch_mult = (
        str(base / "ae"),
        (1, 2, 2, 2),
    )  # 8x8 images fit, 4x4 latents not
    with pytest.raises(
        ConfigError, match=r"^model.latent_size 4 must be a positive multiple of 8 for 4 U-Net"
    ):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_latent_run_resumes_from_the_command_line(runs, tmp_path, capsys):
    """Its request leaves the latent shape open; the run resolved it, and resuming asks for it again."""
    base, _ = runs
    shutil.copytree(base / "latent", tmp_path / "latent")
    assert main(["train", "--resume", str(tmp_path / "latent"), "--steps", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    ckpt = Checkpoint(tmp_path / "latent")
    assert ckpt.request["model"]["latent_size"] == 0 and ckpt.config["model"]["latent_size"] == 4
    assert ckpt.resolved["model.latent_size"] == 4 and ckpt.resolved["model.latent_channels"] == 2
