import json

import pytest

from ddpm.cli import main
from ddpm.errors import ConfigError
from ddpm.presets import preset


def test_config_file_and_overrides(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('preset = "cifar10"\n[train]\nlr = 1e-4\n[model]\ndropout = 0.2\n')
    assert main(["config", "--config", str(tmp_path / "c.toml"), "--set", "train.batch_size=32"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "cifar10" and cfg["train"]["lr"] == 1e-4 and cfg["model"]["dropout"] == 0.2
    assert cfg["train"]["batch_size"] == 32 and cfg["model"]["ch_mult"] == [1, 2, 2, 2]


def test_read_config_file_returns_the_sections_as_written(tmp_path):
    """Parsing only: the file's `preset` is kept for ddpm.presets.load_file to start from."""
    from ddpm.config import read_config_file

    (tmp_path / "c.toml").write_text('preset = "toy2d"\n[train]\nlr = 1e-4\n')
    (tmp_path / "c.json").write_text('{"preset": "toy2d", "train": {"lr": 1e-4}}')
    for name in ("c.toml", "c.json"):
        assert read_config_file(tmp_path / name) == {"preset": "toy2d", "train": {"lr": 1e-4}}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        read_config_file(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "none.json")


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
