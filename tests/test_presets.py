"""ddpm.presets: the named configurations, configs/*.json written from them, and resolving a run's config."""

import ast
import json
import runpy
from pathlib import Path

import pytest

from ddpm.errors import ConfigError
from ddpm.presets import PRESETS, load_file, preset, preset_json, resolve_config

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "configs"
REGENERATE = "regenerate them with `.venv/bin/python scripts/write_configs.py`"


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


def test_no_fashion_mnist_preset_flips():
    """Fashion-MNIST's shoes all face left: a half-flipped copy of the real test images scores domain FID
    44.75 against the test split (docs/results.md), so a model trained on flips cannot score below that."""
    fashion = [name for name in PRESETS if preset(name).data.dataset == "fashion-mnist"]
    assert len(fashion) == 9
    assert [name for name in fashion if preset(name).data.random_flip] == []


def test_the_fashion_mnist_text_models_learn_prompts_without_words_as_the_whole_class():
    """Without attribute dropout "a photo of a coat" describes only the middle-third coats, whose real images
    score domain FID 13.81 against the test split (docs/conditioning.md): the text presets drop half."""
    text = [name for name in PRESETS if preset(name).model.text_encoder]
    assert sorted(text) == ["fashion-mnist-latent-text", "fashion-mnist-text", "fashion-mnist-text-14"]
    assert {preset(name).data.caption_attribute_dropout for name in text} == {0.5}
    assert preset("fashion-mnist-text-encoder").data.caption_attribute_dropout == 0  # it learns the words


# shared/PAPER.md section 2 (the paper's hyper-parameters), row by row, for each of the paper's presets:
# config key -> value. The 256 column is CelebA-HQ / LSUN; lsun256 is the 2.4M-step Bedroom run, which the
# paper trained without flips.
PAPER_32 = {
    "diffusion.num_timesteps": 1000,  # T, betas: 1000, linear 1e-4 -> 0.02
    "diffusion.beta_schedule": "linear",
    "diffusion.beta_start": 1e-4,
    "diffusion.beta_end": 0.02,
    "diffusion.mean_type": "eps",  # target, loss: eps, mean squared error (L_simple)
    "diffusion.loss_type": "mse",
    "diffusion.var_type": "fixedlarge",  # reverse variance: "fixed large"
    "train.optimizer": "adam",  # Adam (0.9, 0.999, eps 1e-8), lr 2e-4, no weight decay
    "train.adam_beta1": 0.9,
    "train.adam_beta2": 0.999,
    "train.adam_eps": 1e-8,
    "train.lr": 2e-4,
    "train.weight_decay": 0.0,
    "train.warmup_steps": 5000,  # lr schedule: linear warm-up over 5000 steps, then constant
    "train.lr_schedule": "constant",
    "train.batch_size": 128,  # batch, grad clip: 128, global-norm 1.0
    "train.grad_accum": 1,
    "train.grad_clip": 1.0,
    "train.ema_decay": 0.9999,  # EMA: 0.9999 from step 1
    "model.dropout": 0.1,  # dropout, flips: 0.1, random horizontal flip
    "data.random_flip": True,
    "train.steps": 800_000,  # steps: 800k
    "model.kind": "unet",  # UNet: ch 128, ch_mult (1,2,2,2), 2 res blocks, attention at 16x16
    "model.ch": 128,
    "model.ch_mult": [1, 2, 2, 2],
    "model.num_res_blocks": 2,
    "model.attn_resolutions": [16],
    "model.num_groups": 32,  # section 3: GroupNorm with 32 groups
    "model.resamp_with_conv": True,
    "data.dataset": "cifar10",
    "data.image_size": 32,
}
PAPER_256 = {
    **PAPER_32,
    "diffusion.var_type": "fixedsmall",
    "train.lr": 2e-5,
    "train.batch_size": 64,
    "model.dropout": 0.0,
    "model.ch_mult": [1, 1, 2, 2, 4, 4],
    "data.dataset": "folder",
    "data.image_size": 256,
}
PAPER = {
    "cifar10": (PAPER_32, 35_746_307),
    "celebahq256": ({**PAPER_256, "train.steps": 500_000}, 113_673_219),
    "lsun256": ({**PAPER_256, "train.steps": 2_400_000, "data.random_flip": False}, 113_673_219),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_the_paper_presets_match_the_papers_table_field_by_field(name):
    """Every hyper-parameter of PAPER.md's table, and the exact parameter count of the network the preset
    builds (on the meta device: no memory for 114M weights)."""
    import torch

    from ddpm.build import build_model

    table, parameters = PAPER[name]
    cfg = preset(name)
    values = json.loads(json.dumps(cfg.to_dict()))  # as configs/*.json and checkpoints hold it
    for key, expected in table.items():
        section, field = key.split(".")
        assert values[section][field] == expected, (
            f"{name}: {key} is {values[section][field]!r}, paper {expected!r}"
        )
    assert not cfg.model.num_classes and not cfg.model.text_encoder and not cfg.model.low_res
    with torch.device("meta"):
        model = build_model(cfg, 3)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_a_preset_is_a_fresh_config_each_time_and_an_unknown_one_is_named():
    a = preset("fashion-mnist")
    a.train.steps = 1
    assert preset("fashion-mnist").train.steps == 1375
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of cifar10, celebahq256"):
        preset("nope")
    with pytest.raises(ConfigError, match=r"unknown preset \[1\]"):  # a config file's "preset": [1]
        preset([1])


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_files_are_the_presets_written_out(name):
    """configs/NAME.json is preset NAME as `ddpm config --preset NAME` prints it, and loads back to it."""
    path = CONFIGS / f"{name}.json"
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    text = path.read_text(encoding="utf-8")
    assert text == preset_json(name), f"{path} differs from preset {name}: {REGENERATE}"
    assert load_file(path).to_dict() == preset(name).to_dict()


def test_every_config_file_names_a_preset():
    stale = sorted(p.name for p in CONFIGS.glob("*.json") if p.stem not in PRESETS)
    assert not stale, f"configs/ holds {stale}, which name no preset: {REGENERATE} (it removes them)"


def test_write_configs_writes_every_preset_and_checks(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / "write_configs.py"))["main"]
    (tmp_path / "old-preset.json").write_text("{}")
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert "no such preset" in capsys.readouterr().out
    assert main(["--dir", str(tmp_path)]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(PRESETS)
    assert all((tmp_path / f"{name}.json").read_text() == preset_json(name) for name in PRESETS)
    assert main(["--check", "--dir", str(tmp_path)]) == 0


def test_the_config_module_does_not_import_the_presets():
    """ddpm.presets builds on ddpm.config: the other way round would be an import cycle."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "src" / "ddpm" / "config.py").read_text())):
        if isinstance(node, ast.ImportFrom):  # `from .presets import x`, `from . import presets`
            imported.add((node.module or "").removeprefix("ddpm").lstrip("."))
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name.removeprefix("ddpm.") for a in node.names)
    assert "presets" not in imported


def test_load_file_starts_from_the_files_preset_or_the_given_base(tmp_path):
    (tmp_path / "c.json").write_text('{"preset": "toy2d", "train": {"lr": 0.5}}')
    cfg = load_file(tmp_path / "c.json")
    assert cfg.name == "toy2d" and cfg.model.kind == "mlp" and cfg.train.lr == 0.5
    base = preset("cifar10")
    cfg = load_file(tmp_path / "c.json", base=base)
    assert cfg.name == "cifar10" and cfg.train.lr == 0.5 and base.train.lr == 2e-4  # base is not changed
    (tmp_path / "plain.json").write_text('{"train": {"lr": 0.5}}')
    assert load_file(tmp_path / "plain.json").name == "fashion-mnist"  # the CLI's default preset


def test_resolve_config_order_preset_file_values_overrides(tmp_path):
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
