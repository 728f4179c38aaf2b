import pytest
import torch
from conftest import count_parameters, tiny_config

from ddpm.build import build_diffusion, build_model, load_model
from ddpm.checkpoint import save_checkpoint
from ddpm.errors import CheckpointError, ConfigError
from ddpm.mlp import MLPDenoiser
from ddpm.presets import preset
from ddpm.unet import UNet


def test_models_follow_the_config(tmp_path):
    assert count_parameters(build_model(preset("cifar10"), 3)) == 35_746_307
    cfg = tiny_config(tmp_path)
    assert isinstance(build_model(cfg, 1), UNet)
    cfg.diffusion.var_type, cfg.diffusion.loss_type = "learned_range", "hybrid"
    assert build_model(cfg, 1).conv_out.out_channels == 2  # a learned variance doubles the output
    toy = preset("toy2d")
    assert isinstance(build_model(toy, 2), MLPDenoiser)
    cfg.diffusion.var_type = "huge"
    with pytest.raises(ConfigError, match="unknown variance type 'huge'"):
        build_model(cfg, 1)


def test_diffusion_follows_the_config(tmp_path):
    cfg = tiny_config(tmp_path)
    d = build_diffusion(cfg)
    assert d.num_timesteps == 50 and d.var_type == "fixedlarge"
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)


def test_load_model_round_trips_and_swaps_fixed_variances(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.channels = 1
    torch.manual_seed(0)
    model, ema = build_model(cfg, 1), build_model(cfg, 1)
    save_checkpoint(tmp_path / "checkpoint.safetensors", cfg.to_dict(), model.state_dict(), ema.state_dict())
    loaded, diffusion, loaded_cfg = load_model(tmp_path)
    assert not loaded.training
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    raw, _, _ = load_model(tmp_path, use_ema=False)
    assert torch.equal(raw.conv_in.weight, model.conv_in.weight)
    _, swapped, swapped_cfg = load_model(tmp_path, var_type="fixedsmall")
    assert swapped.var_type == "fixedsmall" and swapped_cfg.diffusion.var_type == "fixedsmall"
    with pytest.raises(ConfigError, match="only fixedsmall and fixedlarge"):
        load_model(tmp_path, var_type="learned")


def test_load_model_refuses_weights_that_do_not_fit(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.channels = 1
    save_checkpoint(tmp_path / "checkpoint.safetensors", cfg.to_dict(), {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"do not fit its config \(size mismatch for conv_in.weight"):
        load_model(tmp_path, use_ema=False)
    save_checkpoint(tmp_path / "checkpoint.safetensors", cfg.to_dict(), {"extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="do not fit its config .missing"):
        load_model(tmp_path, use_ema=False)


def test_nan_weights_are_refused_not_sampled_black(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.channels = 1
    state = build_model(cfg, 1).state_dict()
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_checkpoint(
        tmp_path / "checkpoint.safetensors", cfg.to_dict(), state, {k: v.clone() for k, v in state.items()}
    )
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights \(conv_out.bias\)"):
        load_model(tmp_path)


def test_load_network_gives_the_ema_weights_wrapped_for_the_runtime(tmp_path):
    from ddpm.build import load_network
    from ddpm.runtime import Runtime, wrap_network

    cfg = tiny_config(tmp_path)
    cfg.data.channels = 1
    torch.manual_seed(0)
    model, ema = build_model(cfg, 1), build_model(cfg, 1)
    save_checkpoint(tmp_path / "checkpoint.safetensors", cfg.to_dict(), model.state_dict(), ema.state_dict())
    loaded = load_network(tmp_path, runtime=Runtime("cpu"))
    assert loaded.weights == "ema" and loaded.device == torch.device("cpu") and not loaded.model.training
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert loaded.network is loaded.model  # fp32 without speed options: the model itself
    assert loaded.diffusion.num_timesteps == loaded.cfg.diffusion.num_timesteps == 50
    assert loaded.checkpoint.path == tmp_path / "checkpoint.safetensors"
    raw = load_network(tmp_path, "model", Runtime("cpu"), var_type="fixedsmall")
    assert raw.weights == "model" and torch.equal(raw.model.conv_in.weight, model.conv_in.weight)
    assert raw.diffusion.var_type == "fixedsmall"
    # the runtime's options reach the network: as wrap_network gives them
    fast = load_network(tmp_path, runtime=Runtime("cpu", "bf16", channels_last=True))
    assert fast.runtime == Runtime(torch.device("cpu"), "bf16", channels_last=True)
    assert fast.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    with torch.no_grad():
        expected = wrap_network(load_model(tmp_path)[0], "cpu", "bf16", channels_last=True)(x, t)
        assert torch.equal(fast.network(x, t), expected)
    with pytest.raises(ConfigError, match=r"^weights must be one of ema, model, got 'raw'$"):
        load_network(tmp_path, "raw")
    auto = load_network(tmp_path, runtime=Runtime("cpu", "auto"))  # chooses at its first call
    assert auto.probed is auto.network and auto.record() == {"precision": "auto"}
    bad = r"^precision must be one of fp32, bf16, bf16-norm, auto, got 'fp16'$"
    with pytest.raises(ConfigError, match=bad):
        load_network(tmp_path, runtime=Runtime(precision="fp16"))
