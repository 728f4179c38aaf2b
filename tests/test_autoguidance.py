"""Autoguidance (Karras et al. 2024): a model guided away from a weaker version of itself, alone or under
classifier-free guidance, from the Python API and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpm.build import load_network
from ddpm.conditioning import ClassIds, autoguided, guided
from ddpm.errors import ConfigError
from ddpm.images import to_uint8
from ddpm.sample import generate, sample_to_dir


def linear_model(a: float, b: float):
    """out = a * x + b * t, one output channel per input channel plus a 'variance' channel of 7s, and a
    condition that adds its class id: an output we can write down."""

    def model(x, t, *cond):
        out = a * x + b * t.float().reshape(-1, 1, 1, 1)
        if cond:
            out = out + cond[0].ids.float().reshape(-1, 1, 1, 1)
        return torch.cat([out, torch.full_like(out, 7.0)], dim=1)

    return model


def test_autoguidance_is_one_plus_w_good_minus_w_bad_on_the_prediction_channels():
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 5, 9])
    good, bad = linear_model(2.0, 0.1), linear_model(0.5, 0.3)
    out = autoguided(good, bad, 1.5)(x, t)
    expected = 2.5 * good(x, t)[:, :2] - 1.5 * bad(x, t)[:, :2]
    torch.testing.assert_close(out[:, :2], expected)
    assert torch.equal(out[:, 2:], good(x, t)[:, 2:])  # the variance channels are the good model's
    # w = 0 is the model itself, and never runs the weaker one
    never = lambda *a: pytest.fail("the weaker model ran")  # noqa: E731
    assert torch.equal(autoguided(good, never, 0.0)(x, t), good(x, t))
    with pytest.raises(ConfigError, match="^autoguidance must be a finite number >= 0"):
        autoguided(good, bad, -1.0)


def test_classifier_free_guidance_wraps_the_autoguided_model():
    """Under CFG each branch (conditional, null) is autoguided: with both, the output is written out."""
    x, t = torch.randn(2, 1, 3, 3), torch.tensor([4, 2])
    good, bad = linear_model(1.5, 0.2), linear_model(0.7, 0.05)
    cond, null, wa, wc = ClassIds.of([1, 2]), ClassIds.of(3), 0.8, 2.0
    out = guided(autoguided(good, bad, wa), cond, null, wc, channels=1)(x, t)

    def auto(c):
        return (1 + wa) * good(x, t, c)[:, :1] - wa * bad(x, t, c)[:, :1]

    nulls = ClassIds.of([3, 3])
    torch.testing.assert_close(out[:, :1], (1 + wc) * auto(cond) - wc * auto(nulls))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_idx_dir

    from ddpm.train import Trainer

    base = tmp_path_factory.mktemp("autoguide")
    cfg = tiny_config(make_idx_dir(base / "idx"), steps=6)
    Trainer(cfg, base / "run", progress=False).train()
    return base / "run"


def test_sampling_with_autoguidance_is_the_ema_guided_away_from_the_raw_weights(run, tmp_path):
    opts = dict(num=4, batch_size=4, steps=5, sampler="ddim", seed=3, progress=False)
    ema, raw = load_network(run, "ema"), load_network(run, "model")
    shape = (1, 8, 8)

    def drawn(folder):
        return np.load(folder / "samples.npz")["arr_0"]

    def by_hand(network):
        images = generate(network, ema.diffusion, 4, shape, steps=5, sampler="ddim", seed=3)
        return to_uint8(images).permute(0, 2, 3, 1).numpy()

    record = sample_to_dir(run, tmp_path / "plain", **opts)
    assert "autoguidance" not in record
    np.testing.assert_array_equal(drawn(tmp_path / "plain"), by_hand(ema.network))  # the comparison holds
    record = sample_to_dir(run, tmp_path / "auto", autoguidance=2.0, **opts)
    assert record["autoguidance"] == 2.0 and record["autoguide_from"] == "model weights"
    auto = drawn(tmp_path / "auto")
    np.testing.assert_array_equal(auto, by_hand(autoguided(ema.network, raw.network, 2.0)))
    assert not np.array_equal(auto, drawn(tmp_path / "plain"))
    # another checkpoint as the weaker model: the run's own checkpoint copied is the EMA itself, so w
    # changes nothing ((1 + w) * ema - w * ema)
    earlier = tmp_path / "earlier"
    shutil.copytree(run, earlier)
    record = sample_to_dir(run, tmp_path / "same", autoguidance=2.0, autoguide_from=earlier, **opts)
    assert record["autoguide_from"] == str(earlier)
    assert np.abs(drawn(tmp_path / "same").astype(int) - drawn(tmp_path / "plain")).max() <= 1


def test_bad_autoguidance_is_one_line_with_nothing_written(run, tmp_path, capsys):
    from ddpm.cli import main

    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="^autoguidance of the raw weights needs a weaker model") as e:
        sample_to_dir(run, out, num=2, autoguidance=1.0, use_ema=False, progress=False)
    assert e.value.field == "autoguide_from"
    other = tmp_path / "other"
    cfg = tiny_config(run.parent / "idx", steps=1)
    cfg.model.ch = 16
    from ddpm.train import Trainer

    Trainer(cfg, other, progress=False).train()
    with pytest.raises(ConfigError, match="is another network \\(model.ch differs\\)"):
        sample_to_dir(run, out, num=2, autoguidance=1.0, autoguide_from=other, progress=False)
    argv = ["sample", str(run), "--num", "2", "--out", str(out), "--no-progress"]
    assert main([*argv, "--autoguidance", "1", "--no-ema"]) == 2
    err = capsys.readouterr().err
    assert "autoguidance of the raw weights needs a weaker model: give --autoguide-from" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--autoguidance", "nan"]) == 2
    assert "--autoguidance must be a finite number" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--autoguidance", "0.5", "--steps", "3", "--sampler", "ddim"]) == 0
    assert json.loads((out / "samples.json").read_text())["autoguidance"] == 0.5
