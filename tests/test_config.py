import json

import pytest

from ddpm.cli import main
from ddpm.config import preset


def test_config_file_and_overrides(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('preset = "cifar10"\n[train]\nlr = 1e-4\n[model]\ndropout = 0.2\n')
    assert main(["config", "--config", str(tmp_path / "c.toml"), "--set", "train.batch_size=32"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "cifar10" and cfg["train"]["lr"] == 1e-4 and cfg["model"]["dropout"] == 0.2
    assert cfg["train"]["batch_size"] == 32 and cfg["model"]["ch_mult"] == [1, 2, 2, 2]


def test_paper_preset_values():
    cfg = preset("cifar10")
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.grad_clip, t.ema_decay, t.batch_size) == (2e-4, 5000, 1.0, 0.9999, 128)
    assert (cfg.model.dropout, cfg.data.random_flip, cfg.diffusion.var_type) == (0.1, True, "fixedlarge")
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.num_timesteps) == (
        1e-4,
        0.02,
        1000,
    )
    big = preset("celebahq256")
    assert (big.train.lr, big.train.batch_size, big.model.dropout) == (2e-5, 64, 0.0)


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun256", "fashion-mnist", "toy2d"])
def test_config_files_match_presets(name):
    """configs/*.json are the presets written out (`ddpm config --preset NAME`); they must not drift."""
    from pathlib import Path

    from ddpm.config import load_file

    path = Path(__file__).parent.parent / "configs" / f"{name}.json"
    assert load_file(path).to_dict() == preset(name).to_dict()
