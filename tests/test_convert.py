"""Importing diffusers DDPM folders (ddpm.convert), through the Python API.

test_unet.py covers the weight-name mapping and the config export. This file covers `ddpm import` and the
importer's API: what it writes, bare UNet folders, legacy attention names, the scheduler mapping and
its refusals.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm.build import build_model
from ddpm.checkpoint import CHECKPOINT_NAME, Checkpoint
from ddpm.cli import main
from ddpm.config import Config, DiffusionConfig, ModelConfig
from ddpm.convert import (
    diffusers_unet_config,
    diffusion_config_from_diffusers,
    import_diffusers,
    load_diffusers_folder,
    model_config_from_diffusers,
)
from ddpm.errors import CheckpointError
from ddpm.schedules import make_betas

TINY = ModelConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_unet(size=8, channels=3, seed=0, model=TINY):
    """A diffusers UNet2DModel of the DDPM form with random, non-trivial weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**diffusers_unet_config(model, size, channels)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return unet


def write_pipeline(folder, unet, **scheduler):
    """A diffusers pipeline folder: model_index.json, unet/ and scheduler/."""
    from diffusers import DDPMScheduler

    unet.save_pretrained(folder / "unet")
    DDPMScheduler(**scheduler).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return folder


def write_unet_folder(folder, config, tensors=None):
    """A bare UNet folder holding config.json and a safetensors file (a stand-in tensor by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else {"conv_in.weight": torch.zeros(1)}, str(folder / WEIGHTS))
    return folder


def good_unet_config(size=8, channels=3):
    return json.loads(json.dumps(diffusers_unet_config(TINY, size, channels)))  # tuples -> lists


def test_import_api_writes_a_checkpoint_computing_the_diffusers_function(tmp_path):
    unet = tiny_unet()
    folder = write_pipeline(
        tmp_path / "ddpm-tiny",
        unet,
        num_train_timesteps=40,
        beta_start=2e-4,
        beta_end=0.03,
        beta_schedule="scaled_linear",
        variance_type="fixed_small",
    )
    run = tmp_path / "runs" / "imported"
    path = import_diffusers(folder, run)
    assert path == run / CHECKPOINT_NAME and path.is_file()

    ckpt = Checkpoint(run)
    assert ckpt.train_state == {"step": 0, "imported_from": str(folder.resolve()), "model_is_ema": True}
    assert ckpt.ema == {} and ckpt.optimizer == {}
    assert json.loads((run / "config.json").read_text()) == ckpt.config
    cfg = Config.from_dict(ckpt.config)
    assert cfg.name == "imported:ddpm-tiny"
    assert cfg.model == TINY
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.channels) == ("folder", 8, 3)
    assert cfg.diffusion == DiffusionConfig(
        num_timesteps=40, beta_schedule="quad", beta_start=2e-4, beta_end=0.03, var_type="fixedsmall"
    )

    ours = build_model(cfg, 3).eval()
    ours.load_state_dict(ckpt.weights(use_ema=True), strict=True)  # model_is_ema: no --no-ema needed
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 17, 39])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)


def test_bare_unet_folder_without_scheduler_uses_the_scheduler_defaults(tmp_path):
    """A folder holding only the UNet (config.json and weights, no unet/ or scheduler/) imports too;
    the diffusion is the diffusers DDPMScheduler's defaults."""
    unet = tiny_unet(channels=1, seed=3)
    unet.save_pretrained(tmp_path / "bare")
    import_diffusers(tmp_path / "bare", tmp_path / "run")
    ckpt = Checkpoint(tmp_path / "run")
    cfg = Config.from_dict(ckpt.config)
    assert cfg.diffusion == DiffusionConfig(num_timesteps=1000, var_type="fixedsmall")
    assert cfg.data.channels == 1
    ours = build_model(cfg, 1).eval()
    ours.load_state_dict(ckpt.weights(), strict=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)


def test_legacy_attention_names_import_to_the_same_function(tmp_path):
    """The published google/ddpm-* weights use diffusers' pre-0.15 attention names (query / key / value /
    proj_attn) with Linear weights; they must map onto the same network."""
    unet = tiny_unet(seed=1)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    weights_file = tmp_path / "pipe" / "unet" / WEIGHTS
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, tensor in load_file(str(weights_file)).items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = tensor
    assert any(".query." in k for k in renamed) and any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(weights_file))

    import_diffusers(tmp_path / "pipe", tmp_path / "run")
    ckpt = Checkpoint(tmp_path / "run")
    ours = build_model(Config.from_dict(ckpt.config), 3).eval()
    ours.load_state_dict(ckpt.weights(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "size,channels,dataset",
    [(32, 3, "cifar10"), (8, 3, "folder"), (32, 1, "folder"), ([16, 16], 1, "folder")],
)
def test_dataset_and_size_from_the_unet_config(tmp_path, size, channels, dataset):
    config = good_unet_config(channels=channels)
    config["sample_size"] = size
    write_unet_folder(tmp_path / "unet", config)
    cfg, _ = load_diffusers_folder(tmp_path)
    expected_size = size[0] if isinstance(size, list) else size
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.channels) == (dataset, expected_size, channels)
    assert cfg.model.attn_resolutions == (expected_size // 2,)  # attention on the second level


@pytest.mark.parametrize(
    "diffusers_name,ours,T",
    [("linear", "linear", 30), ("scaled_linear", "quad", 30), ("squaredcos_cap_v2", "cosine", 50)],
)
def test_beta_schedules_match_the_diffusers_scheduler(diffusers_name, ours, T):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=T, beta_start=3e-4, beta_end=0.04, beta_schedule=diffusers_name
    )
    d = diffusion_config_from_diffusers(dict(scheduler.config))
    assert (d.beta_schedule, d.num_timesteps) == (ours, T)
    betas = make_betas(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)
    torch.testing.assert_close(torch.from_numpy(betas).float(), scheduler.betas, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "setting,expected",
    [
        ({"variance_type": "fixed_small_log"}, ("var_type", "fixedsmall")),
        ({"variance_type": "fixed_large"}, ("var_type", "fixedlarge")),
        ({"variance_type": "fixed_large_log"}, ("var_type", "fixedlarge")),
        ({"prediction_type": "sample"}, ("mean_type", "x0")),
        ({"prediction_type": "v_prediction"}, ("mean_type", "v")),
        ({"prediction_type": "epsilon"}, ("mean_type", "eps")),
        ({}, ("var_type", "fixedsmall")),
    ],
)
def test_scheduler_variance_and_prediction_mapping(setting, expected):
    d = diffusion_config_from_diffusers(setting)
    assert getattr(d, expected[0]) == expected[1]


# ---- refusals: each a CheckpointError that names the problem, and nothing written ----


def import_fails(folder, run, message):
    with pytest.raises(CheckpointError, match=message):
        import_diffusers(folder, run)
    assert not run.exists()


def test_scheduler_with_trained_betas_is_refused(tmp_path):
    folder = write_pipeline(
        tmp_path / "pipe", tiny_unet(), num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4]
    )
    import_fails(folder, tmp_path / "run", "trained_betas can be imported only from `ddpm export`")


@pytest.mark.parametrize(
    "setting,name",
    [
        ({"beta_schedule": "sigmoid"}, "sigmoid"),
        ({"variance_type": "learned"}, "learned"),
        ({"variance_type": "learned_range"}, "learned_range"),
        ({"prediction_type": "flow"}, "flow"),
    ],
)
def test_unsupported_scheduler_settings_are_refused(tmp_path, setting, name):
    write_unet_folder(tmp_path / "pipe" / "unet", good_unet_config())
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(setting))
    import_fails(tmp_path / "pipe", tmp_path / "run", f"unsupported diffusers scheduler setting '{name}'")


def test_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    import_fails(tmp_path / "weights.safetensors", tmp_path / "run", "is not a directory")


def test_missing_unet_config_is_refused(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / WEIGHTS).write_bytes(b"")
    import_fails(tmp_path / "pipe", tmp_path / "run", "no diffusers UNet config.json in .*unet")


def test_missing_weights_are_refused(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(good_unet_config()))
    import_fails(tmp_path / "pipe", tmp_path / "run", "no diffusion_pytorch_model.safetensors or .bin in")


@pytest.mark.parametrize("where", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_damaged_json_is_refused(tmp_path, where):
    folder = write_pipeline(tmp_path / "pipe", tiny_unet())
    (folder / where).write_text('{"in_channels": 3,')
    import_fails(folder, tmp_path / "run", f"cannot read .*{where.split('/')[-1]}")


@pytest.mark.parametrize(
    "name,content",
    [(WEIGHTS, b"\x00\x01 not safetensors"), ("diffusion_pytorch_model.bin", b"not a torch file")],
)
def test_damaged_weights_are_refused(tmp_path, name, content):
    folder = tmp_path / "pipe" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(good_unet_config()))
    (folder / name).write_bytes(content)
    import_fails(tmp_path / "pipe", tmp_path / "run", "cannot read the weights in .*unet")


def test_pickled_code_in_a_bin_file_is_refused(tmp_path):
    """Old .bin folders are torch pickles: anything but tensors (here a callable) must not be loaded."""
    folder = tmp_path / "pipe" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(good_unet_config()))
    torch.save({"conv_in.weight": torch.zeros(1), "hook": print}, folder / "diffusion_pytorch_model.bin")
    import_fails(tmp_path / "pipe", tmp_path / "run", "cannot read the weights in")


@pytest.mark.parametrize(
    "key,value",
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("mid_block_scale_factor", 2),
        ("center_input_sample", True),
    ],
)
def test_unet_settings_other_than_the_papers_are_refused(tmp_path, key, value):
    config = good_unet_config()
    config[key] = value
    write_unet_folder(tmp_path / "unet", config)
    import_fails(
        tmp_path, tmp_path / "run", f"diffusers UNet has {key}={value!r}; only .* matches the DDPM network"
    )


@pytest.mark.parametrize("key", ["flip_sin_to_cos", "freq_shift", "downsample_padding"])
def test_diffusers_defaults_that_differ_from_the_paper_are_refused(key):
    """A config that leaves out a key gets diffusers' default, which is not the DDPM network's value."""
    config = good_unet_config()
    del config[key]
    with pytest.raises(CheckpointError, match=f"diffusers UNet has {key}="):
        model_config_from_diffusers(config)


def test_unequal_input_and_output_channels_are_refused(tmp_path):
    config = good_unet_config()
    config["out_channels"] = 6  # a learned-variance network
    write_unet_folder(tmp_path / "unet", config)
    import_fails(tmp_path, tmp_path / "run", "only UNets with equal input and output channels")


def test_block_channels_that_are_not_multiples_are_refused(tmp_path):
    config = good_unet_config()
    config["block_out_channels"] = [8, 12]
    config["norm_num_groups"] = 4
    write_unet_folder(tmp_path / "unet", config)
    import_fails(tmp_path, tmp_path / "run", r"block_out_channels \[8, 12\] are not multiples of the first")


def test_weights_with_other_channels_than_the_config_are_refused(tmp_path):
    """Weights of a 1-channel network under a config that says 3 channels: a shape mismatch."""
    tiny_unet(channels=1).save_pretrained(tmp_path / "pipe" / "unet")
    config_path = tmp_path / "pipe" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(in_channels=3, out_channels=3)
    config_path.write_text(json.dumps(config))
    import_fails(
        tmp_path / "pipe",
        tmp_path / "run",
        r"do not fit the DDPM U-Net \(size mismatch for conv_in.weight: .*torch.Size\(\[8, 1, 3, 3\]\)",
    )


def test_weights_with_missing_or_extra_tensors_are_refused(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    weights_file = tmp_path / "pipe" / "unet" / WEIGHTS
    state = load_file(str(weights_file))
    del state["conv_out.bias"]
    state["extra_head.weight"] = torch.zeros(2)
    save_file(state, str(weights_file))
    import_fails(
        tmp_path / "pipe",
        tmp_path / "run",
        r"do not fit the DDPM U-Net \(missing \['conv_out.bias'\], unexpected \['extra_head.weight'\]\)",
    )


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    folder = write_pipeline(tmp_path / "pipe", tiny_unet())
    run = tmp_path / "run"
    import_diffusers(folder, run)
    before = (run / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint; choose another run_dir") as e:
        import_diffusers(folder, run)
    assert e.value.field == "run_dir"  # the CLI says --out
    assert (run / CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_import_diffusers_folder_then_sample(tmp_path, safe_serialization):
    """A diffusers pipeline folder (the layout of google/ddpm-cifar10-32) imports and samples the same
    function: our model's output equals the diffusers UNet's."""
    from diffusers import DDPMScheduler
    from test_unet import diffusers_paper_unet

    torch.manual_seed(0)
    unet = diffusers_paper_unet(sample_size=8, channels=(32, 64), attn_level=1)
    folder = tmp_path / "ddpm-tiny"
    unet.save_pretrained(folder / "unet", safe_serialization=safe_serialization)  # .safetensors or .bin
    DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))

    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 0
    from ddpm.sample import load_model

    model, diffusion, cfg = load_model(tmp_path / "run")
    assert cfg.model.attn_resolutions == (4,) and cfg.diffusion.var_type == "fixedlarge"
    assert diffusion.num_timesteps == 50
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 49])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)
    assert (
        main(
            [
                "sample",
                str(tmp_path / "run"),
                "--num",
                "2",
                "--steps",
                "5",
                "--out",
                str(tmp_path / "s"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_import_rejects_a_unet_that_is_not_the_papers(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    config = {"norm_eps": 1e-5, "block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "norm_eps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_import_rejects_multi_head_attention(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    config = {
        "norm_eps": 1e-6,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "block_out_channels": [32, 64],
        "attention_head_dim": 8,
        "in_channels": 3,
        "out_channels": 3,
    }
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "attention_head_dim" in capsys.readouterr().err


PAPER_UNET = {  # a diffusers UNet config of the DDPM form, for the refusal cases
    "norm_eps": 1e-6,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "norm_num_groups": 4,
    "in_channels": 3,
    "out_channels": 3,
}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda u, s: u.pop("block_out_channels"), "has no block_out_channels"),
        (lambda u, s: u.pop("down_block_types"), "has no down_block_types"),
        (lambda u, s: s.update(num_train_timesteps="many"), "bad number"),
        (lambda u, s: s.update(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (
            lambda u, s: u.update(down_block_types=["DownBlock2D", "FancyDownBlock2D"]),
            "'FancyDownBlock2D' block",
        ),
        (lambda u, s: u.update(up_block_types=["UpBlock2D", "UpBlock2D"]), "do not mirror"),
        (lambda u, s: u.update(sample_size=[32, 16]), "sample_size=[32, 16]; the DDPM network is square"),
    ],
)
def test_incomplete_or_unfaithful_configs_are_one_line_errors(tmp_path, capsys, change, message):
    unet, sched = dict(PAPER_UNET), {"num_train_timesteps": 1000}
    change(unet, sched)
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_an_object_is_refused(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("[1, 2]")
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "holds a JSON list, not an object" in capsys.readouterr().err


def test_an_image_size_the_levels_do_not_divide_is_refused(tmp_path, capsys):
    folder = write_pipeline(tmp_path / "pipe", tiny_unet())
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": 31}))
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "image_size 31 must be a positive multiple of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
