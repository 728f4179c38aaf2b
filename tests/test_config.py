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
        ("model.ch", 36, "divisible by model.num_groups"),
        ("data.image_size", 30, "multiple of 8"),
        ("train.optimizer", "sgd", "train.optimizer must be adam or adamw"),
        ("train.lr_schedule", "step", "train.lr_schedule constant or cosine or linear"),
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


def test_the_model_section_is_its_kinds_own():
    """model.kind chooses the section's dataclass, which holds that kind's fields alone; the U-Net's
    conditioning fields read as "none" on the others, and no field of another kind can be set."""
    from ddpm.config import MLPConfig, ModelConfig, TextEncoderConfig, UNetConfig, set_value

    assert type(ModelConfig()) is UNetConfig and type(ModelConfig(kind="mlp", mlp_layers=2)) is MLPConfig
    toy = preset("toy2d")
    assert toy.to_dict()["model"] == {"kind": "mlp", "mlp_hidden": 128, "mlp_layers": 3}
    assert (toy.model.num_classes, toy.model.context_dim, toy.model.low_res, toy.model.autoencoder) == (
        0,
        0,
        0,
        "",
    )
    with pytest.raises(AttributeError, match="the mlp model has no field 'num_classes'"):
        toy.model.num_classes = 3
    with pytest.raises(ConfigError, match="model.mlp_hidden is a field of the mlp model, and this config's "):
        set_value(preset("cifar10"), "model.mlp_hidden", 64)
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        set_value(toy, "model.width", 64)
    with pytest.raises(ConfigError, match="model.kind must be unet, mlp, autoencoder, text-encoder"):
        set_value(toy, "model.kind", "transformer")
    # a change of kind keeps the fields the kinds share (the preset's levels for an autoencoder)
    cfg = preset("fashion-mnist")
    set_value(cfg, "model.ch", 64)
    set_value(cfg, "model.kind", "autoencoder")
    assert (cfg.model.kind, cfg.model.ch, cfg.model.ch_mult, cfg.model.kl_weight) == (
        "autoencoder",
        64,
        (1, 2, 2),
        1e-6,
    )
    assert isinstance(preset("fashion-mnist-text-encoder").model, TextEncoderConfig)


def test_configs_written_with_one_flat_model_section_still_load():
    """Configs and checkpoints written before the split hold every kind's 28 fields in one section
    (an MLP run's dropout = 0.0 too): each loads as its kind's section, the other kinds' fields left out."""
    from ddpm.config import Config

    flat = {"latent_channels": 4, "kl_weight": 1e-06, "autoencoder": "", "latent_size": 0, "ch": 128}
    flat |= {"ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0}
    flat |= {"resamp_with_conv": True, "num_groups": 32, "num_classes": 0, "text_encoder": ""}
    flat |= {"context_dim": 0, "text_tower": "frozen", "low_res": 0, "low_res_noise_max": 250}
    flat |= {"low_res_noise": 50, "tokenizer": "bytes", "text_width": 128, "text_layers": 3, "text_heads": 4}
    flat |= {"text_max_length": 77, "image_width": 32, "embed_dim": 128, "mlp_hidden": 128, "mlp_layers": 3}
    assert len(flat | {"kind": ""}) == 28  # the flat section of those days (pooled_dim came later)
    for name in ("toy2d", "fashion-mnist-text-encoder", "fashion-mnist-autoencoder", "fashion-mnist"):
        cfg = preset(name).to_dict()
        old = {**cfg, "model": {**flat, **cfg["model"]}}  # the kind's own values over the flat defaults
        assert Config.from_dict(old) == preset(name)
    # the kind is applied first wherever the file puts it
    late = {"model": {"mlp_layers": 2, "ch": 64, "kind": "mlp"}}
    assert Config.from_dict(late).model.mlp_layers == 2


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
