import json

import pytest

from ddpm.cli import main
from ddpm.config import preset
from ddpm.errors import ConfigError


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


def test_resolve_config_order_preset_file_values_overrides(tmp_path):
    from ddpm.config import resolve_config

    (tmp_path / "c.json").write_text('{"train": {"lr": 0.5, "batch_size": 8}}')
    cfg = resolve_config(
        None,
        "cifar10",
        tmp_path / "c.json",
        {"train.lr": 0.25, "train.seed": None, "data.image_size": 16},
        ["train.lr=0.125"],
    )
    assert cfg.name == "cifar10" and cfg.train.batch_size == 8  # the file over the preset
    assert cfg.train.lr == 0.125 and cfg.data.image_size == 16 and cfg.train.seed == 0  # None skipped
    assert resolve_config().name == "fashion-mnist"  # the default preset
    base = preset("toy2d")
    assert resolve_config(base, values={"train.steps": 9}) is base and base.train.steps == 9
    with pytest.raises(ConfigError, match="a resumed run keeps its own config"):
        resolve_config(base, "cifar10")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.precision", "fp16", "train.precision must be one of fp32, bf16, bf16-norm"),
        ("train.ema_decay", 1.0, "ema_decay must be in"),
        ("train.sample_steps", 5000, "sample_steps must be in 1..1000"),
        ("model.kind", "transformer", "model.kind must be unet, mlp, autoencoder, text-encoder"),
        ("model.ch", 36, "divisible by model.num_groups"),
        ("data.image_size", 30, "multiple of 8"),
        ("train.optimizer", "sgd", "train.optimizer must be adam or adamw"),
        ("train.lr_schedule", "linear", "train.lr_schedule constant or cosine"),
        ("train.time_limit_minutes", 0, "time_limit_minutes must be positive"),
    ],
)
def test_validate_names_the_bad_value(key, value, message):
    from ddpm.config import set_value, validate

    cfg = preset("cifar10")
    validate(cfg)
    set_value(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_values_are_coerced_to_the_field_types():
    from ddpm.config import set_value

    cfg = preset("cifar10")
    for key, text, expected in [
        ("train.lr", "3e-4", 3e-4),
        ("train.steps", "1e3", 1000),
        ("train.compile", "yes", True),
        ("model.ch_mult", "(1,2)", (1, 2)),
        ("train.sample_steps", "none", None),
    ]:
        set_value(cfg, key, text)
        assert getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) == expected
    with pytest.raises(ConfigError, match="train.steps expects int"):
        set_value(cfg, "train.steps", 2.5)


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--set", "train.ema_decay=nan"], ["--lr", "inf"]])
def test_non_finite_numbers_are_one_line_errors(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *flag]) == 2
    err = capsys.readouterr().err
    assert "must be a finite number" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
