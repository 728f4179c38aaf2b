"""The KL autoencoder of latent diffusion: its shapes, its loss terms against torch.distributions, and
its training through the Trainer (latent-shaped noise, the recorded latent scale, resume, the command)."""

import json

import pytest
import torch
from conftest import tiny_config

from ddpm.autoencoder import Autoencoder, autoencoder_loss
from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.config import with_kind
from ddpm.images import to_model_range
from ddpm.latent import measure_scale
from ddpm.rng import sampling_generator, step_generator
from ddpm.train import Trainer


def ae_config(data_dir, **train):
    cfg = tiny_config(data_dir, **train)
    cfg.model = with_kind(cfg.model, "autoencoder")
    cfg.model.latent_channels = 2
    return cfg


def test_shapes_follow_the_levels():
    ae = Autoencoder(channels=1, ch=8, ch_mult=(1, 2, 2), latent_channels=3, num_groups=4)
    mean, logvar = ae.encode(torch.randn(2, 1, 28, 28))
    assert mean.shape == logvar.shape == (2, 3, 7, 7) and ae.factor == 4
    assert ae.decode(mean).shape == (2, 1, 28, 28)


def test_the_loss_terms_are_l1_reconstruction_and_the_kl_from_a_standard_normal():
    torch.manual_seed(0)
    ae = Autoencoder(channels=1, ch=8, ch_mult=(1, 2), latent_channels=2, num_groups=4)
    x, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 2, 4, 4)
    terms = ae(x, noise)
    mean, logvar = ae.encode(x)
    std = torch.exp(0.5 * logvar)
    expected_rec = (ae.decode(mean + std * noise) - x).abs().flatten(1).mean(1)
    posterior, prior = torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    expected_kl = torch.distributions.kl_divergence(posterior, prior).flatten(1).sum(1)
    assert torch.allclose(terms[:, 0], expected_rec, atol=1e-6)
    assert torch.allclose(terms[:, 1], expected_kl, rtol=1e-5)
    loss = autoencoder_loss(ae(x, noise), 0.01)
    assert torch.allclose(loss, expected_rec + 0.01 * expected_kl, rtol=1e-5)


def test_training_draws_latent_noise_records_the_scale_and_learns(idx_dir, tmp_path):
    trainer = Trainer(ae_config(idx_dir, steps=40), tmp_path / "run", progress=False)
    assert trainer.task.batch(0, step_generator(0, 0)).noise.shape == (4, 2, 4, 4)  # latent-shaped
    images = to_model_range(trainer.task.examples.data[:16])
    with torch.no_grad():
        before = (trainer.model.decode(trainer.model.encode(images)[0]) - images).abs().mean()
    trainer.train()
    with torch.no_grad():
        after = (trainer.model.decode(trainer.model.encode(images)[0]) - images).abs().mean()
    assert after < 0.7 * before
    ckpt = Checkpoint(tmp_path / "run")
    ema = trainer.ema.model_copy(trainer.model)
    expected = measure_scale(ema, to_model_range(trainer.task.examples.data[:1024]), sampling_generator(0, 0))
    assert ckpt.train_state["latent_scale"] == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "run" / "samples" / "step_0000040.png").is_file()  # originals over reconstructions


def test_resume_is_bit_exact(idx_dir, tmp_path):
    Trainer(ae_config(idx_dir, steps=7), tmp_path / "a", progress=False).train()
    Trainer(ae_config(idx_dir, steps=3), tmp_path / "b", progress=False).train()
    Trainer(ae_config(idx_dir, steps=7), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    assert a.train_state["latent_scale"] == b.train_state["latent_scale"]


def test_the_command_trains_and_reports_reconstructions(idx_dir, tmp_path, capsys):
    config = tmp_path / "ae.json"
    cfg = ae_config(idx_dir, steps=4)
    config.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "run"
    args = ["train-autoencoder", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "reconstruction.json").read_text())
    assert printed["reconstruction"] == report
    assert report["num_images"] == 10 and report["latent_shape"] == [2, 4, 4] and report["compression"] == 2.0
    assert report["mean_absolute_error"] > 0 and "reconstruction_domain_fid" in report
    # what only an autoencoder takes, and what an autoencoder cannot do
    assert main(["train-autoencoder", "--preset", "fashion-mnist", "--out", str(tmp_path / "x")]) == 2
    assert "trains model.kind=autoencoder" in capsys.readouterr().err
    assert main(["sample", str(out), "--out", str(tmp_path / "s")]) == 2
    assert "is an autoencoder" in capsys.readouterr().err
    assert main(["eval", "nll", str(out)]) == 2
    assert "this is an autoencoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "s").exists()
