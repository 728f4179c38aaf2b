"""Import diffusers-format DDPM weights (e.g. the published `google/ddpm-cifar10-32`) as our checkpoints.

A diffusers `UNet2DModel` configured like the paper's network has the same layers as ours under other
names; this module maps the names (both the current and the older attention naming) and the config.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .build import build_model, load_weights
from .checkpoint import CHECKPOINT_NAME, save_checkpoint
from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig, validate
from .errors import CheckpointError, first_line
from .files import read_json, write_json
from .safeload import load_state_dict

_RESNET = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}
_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names used by diffusers before 0.15 (and by the published DDPM weights)
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_TOP = {
    "time_embedding.linear_1": "temb_dense0",
    "time_embedding.linear_2": "temb_dense1",
    "conv_norm_out": "norm_out",
}


def _rename(name: str) -> tuple[str, bool]:
    """A diffusers parameter name -> (our name, whether it is an attention q/k/v/out projection)."""
    prefix, sep, leaf = name.rpartition(".")  # leaf is weight / bias
    for old, new in _TOP.items():
        if prefix == old:
            return f"{new}.{leaf}", False
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", prefix
    )
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", prefix)
    if m:
        path, level, kind, index, layer = m.groups()
        if kind in ("downsamplers", "upsamplers"):
            return f"{path}.{level}.resample.{layer}.{leaf}", False
        group = "blocks" if kind == "resnets" else "attns"
        base = f"{path}.{level}.{group}.{index}"
    elif mid:
        kind, index, layer = mid.groups()
        base = {("resnets", "0"): "mid_block1", ("resnets", "1"): "mid_block2"}.get((kind, index), "mid_attn")
    else:
        return name, False  # conv_in, conv_out
    if kind == "attentions":
        new = _ATTENTION.get(layer, layer)
        return f"{base}.{new}.{leaf}", new in ("q", "k", "v", "proj_out")
    return f"{base}.{_RESNET.get(layer, layer)}.{leaf}", False


def unet_state_dict_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers UNet2DModel state dict onto :class:`ddpm.unet.UNet` names and shapes."""
    out = {}
    for name, tensor in state.items():
        new, is_projection = _rename(name)
        if is_projection and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[new] = tensor
    return out


def _required(unet_cfg: dict, key: str):
    if key not in unet_cfg:
        raise CheckpointError(f"diffusers UNet config has no {key}; is it a UNet2DModel config?")
    return unet_cfg[key]


def model_config_from_diffusers(unet_cfg: dict) -> tuple[ModelConfig, int, int]:
    """(our model config, image size, channels) for a diffusers UNet2DModel config of the paper's form."""

    def require(key, expected, default=None):
        value = unet_cfg.get(key, default)
        if value != expected:
            raise CheckpointError(
                f"diffusers UNet has {key}={value!r}; only {expected!r} matches the DDPM network"
            )

    require("norm_eps", 1e-6, 1e-5)
    require("flip_sin_to_cos", False, True)
    require("freq_shift", 1, 0)
    require("downsample_padding", 0, 1)
    require("time_embedding_type", "positional", "positional")
    require("act_fn", "silu", "silu")
    require("resnet_time_scale_shift", "default", "default")
    require("mid_block_scale_factor", 1, 1)
    require("center_input_sample", False, False)
    channels = list(_required(unet_cfg, "block_out_channels"))
    ch = channels[0]
    head_dim = unet_cfg.get("attention_head_dim", 8)
    if head_dim is not None and any(head_dim != c for c in channels):
        raise CheckpointError(
            f"diffusers UNet has attention_head_dim={head_dim}: multi-head, not the DDPM network"
        )
    if any(c % ch for c in channels):
        raise CheckpointError(f"block_out_channels {channels} are not multiples of the first")
    size = unet_cfg.get("sample_size", 32)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise CheckpointError(f"diffusers UNet has sample_size={size}; the DDPM network is square")
        size = size[0]
    down_types = _required(unet_cfg, "down_block_types")
    up_types = unet_cfg.get("up_block_types", [t.replace("Down", "Up") for t in down_types][::-1])
    known = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"}
    for kind in [*down_types, *up_types]:
        if kind not in known:
            raise CheckpointError(
                f"diffusers UNet has a {kind!r} block; the DDPM network has only {sorted(known)}"
            )
    if [("Attn" in k) for k in down_types][::-1] != [("Attn" in k) for k in up_types]:
        raise CheckpointError("diffusers UNet's up blocks do not mirror its down blocks (attention)")
    attn = tuple(size // 2**i for i, kind in enumerate(down_types) if "Attn" in kind)
    if unet_cfg.get("in_channels") != unet_cfg.get("out_channels"):
        raise CheckpointError(
            "only UNets with equal input and output channels (fixed variance) can be imported"
        )
    model = ModelConfig(
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=unet_cfg.get("layers_per_block", 2),
        attn_resolutions=attn,
        dropout=float(unet_cfg.get("dropout", 0.0)),
        num_groups=unet_cfg.get("norm_num_groups", 32),
    )
    return model, size, unet_cfg["in_channels"]


def diffusion_config_from_diffusers(sched: dict) -> DiffusionConfig:
    if sched.get("trained_betas") is not None:
        raise CheckpointError("schedulers with trained_betas cannot be imported; use a named beta_schedule")
    if sched.get("rescale_betas_zero_snr"):
        raise CheckpointError(
            "schedulers with rescale_betas_zero_snr cannot be imported (not the paper's betas)"
        )
    schedules = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
    variances = {
        "fixed_small": "fixedsmall",
        "fixed_small_log": "fixedsmall",
        "fixed_large": "fixedlarge",
        "fixed_large_log": "fixedlarge",
    }
    predictions = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
    try:
        return DiffusionConfig(
            num_timesteps=int(sched.get("num_train_timesteps", 1000)),
            beta_schedule=schedules[sched.get("beta_schedule", "linear")],
            beta_start=float(sched.get("beta_start", 1e-4)),
            beta_end=float(sched.get("beta_end", 0.02)),
            var_type=variances[sched.get("variance_type", "fixed_small")],
            mean_type=predictions[sched.get("prediction_type", "epsilon")],
        )
    except KeyError as e:
        raise CheckpointError(f"unsupported diffusers scheduler setting {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"diffusers scheduler config has a bad number ({e})") from None


def _read_json(path: Path) -> dict:
    value = read_json(path, error=CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def load_diffusers_folder(folder: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Read a diffusers pipeline folder (model_index.json, unet/, scheduler/) or a bare UNet folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory")
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"no diffusers UNet config.json in {unet_dir}")
    unet_cfg = _read_json(unet_dir / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}

    model_cfg, size, channels = model_config_from_diffusers(unet_cfg)
    diffusion_cfg = diffusion_config_from_diffusers(sched)
    weights_file = unet_dir / "diffusion_pytorch_model.safetensors"
    try:
        if weights_file.is_file():
            from safetensors.torch import load_file

            state = load_file(str(weights_file))
        elif (unet_dir / "diffusion_pytorch_model.bin").is_file():
            # Older folders ship a torch pickle: read through torch's weights-only unpickler (tensors and
            # plain containers, nothing that runs code), on a torch where that is safe.
            bin_file = unet_dir / "diffusion_pytorch_model.bin"
            try:
                state = load_state_dict(bin_file, bin_file.name, "a state dict", CheckpointError)
            except CheckpointError as e:
                raise CheckpointError(f"cannot read the weights in {unet_dir}: {e}") from None
        else:
            raise CheckpointError(f"no diffusion_pytorch_model.safetensors or .bin in {unet_dir}")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch.load raise several types for a damaged file
        first = first_line(e)
        raise CheckpointError(f"cannot read the weights in {unet_dir}: {first}") from None

    dataset = "cifar10" if (size, channels) == (32, 3) else "folder"
    cfg = Config(
        name=f"imported:{folder.name}",
        model=model_cfg,
        diffusion=diffusion_cfg,
        data=DataConfig(dataset=dataset, image_size=size, channels=channels),
        train=TrainConfig(),
    )
    return cfg, unet_state_dict_from_diffusers(state)


def import_diffusers(folder: str | Path, run_dir: str | Path) -> Path:
    """Convert a diffusers DDPM folder into a run directory that `ddpm sample` reads."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).exists():
        raise CheckpointError(
            f"{run_dir} already holds a checkpoint; choose another run_dir", field="run_dir"
        )
    cfg, state = load_diffusers_folder(folder)
    validate(cfg)  # e.g. a sample_size the U-Net's levels do not divide
    model = build_model(cfg, cfg.data.channels)
    load_weights(model, state, f"weights in {folder} do not fit the DDPM U-Net")
    weights = model.state_dict()
    save_checkpoint(
        run_dir / CHECKPOINT_NAME,
        cfg.to_dict(),
        weights,
        # Published weights are already the EMA weights: stored once, marked as such.
        train_state={"step": 0, "imported_from": str(Path(folder).resolve()), "model_is_ema": True},
    )
    write_json(run_dir / "config.json", cfg.to_dict())
    return run_dir / CHECKPOINT_NAME


def diffusers_unet_config(model: ModelConfig, image_size: int, channels: int) -> dict:
    """The diffusers UNet2DModel config that computes the same function as our UNet for ``model``
    (the inverse of :func:`model_config_from_diffusers`), e.g. to benchmark the two on identical work."""
    levels = len(model.ch_mult)
    attn = [image_size // 2**i in model.attn_resolutions for i in range(levels)]
    return {
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(model.ch * m for m in model.ch_mult),
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "layers_per_block": model.num_res_blocks,
        "norm_eps": 1e-6,
        "norm_num_groups": model.num_groups,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "attention_head_dim": None,
        "dropout": model.dropout,
    }
