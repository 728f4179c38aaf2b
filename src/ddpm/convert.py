"""Import diffusers-format DDPM weights (e.g. the published `google/ddpm-cifar10-32`) as our checkpoints.

A diffusers `UNet2DModel` configured like the paper's network has the same layers as ours under other
names; this module maps the names (both the current and the older attention naming) and the config.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
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
    "class_embedding": "class_embed",
}
# our names for the diffusers scheduler's settings -> theirs
_SCHEDULES = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_VARIANCES = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}
_PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
EXPORT_RECORD = "ddpm-export.json"  # what an exported folder was made from; written last (an OutputFolder)


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


def model_config_from_diffusers(
    unet_cfg: dict, null_class: int | None = None
) -> tuple[ModelConfig, int, int]:
    """(our model config, image size, channels) for a diffusers UNet2DModel config of the paper's form.
    A class embedding is taken only with ``null_class`` (its last id, as `ddpm export` records it): our
    class-conditional networks reserve that id for guidance's "no class"."""

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
    require("class_embed_type", None, None)
    classes = unet_cfg.get("num_class_embeds")
    if classes is not None and classes - 1 != null_class:
        raise CheckpointError(
            f"diffusers UNet has num_class_embeds={classes} and no null class for guidance: only class-"
            "conditional folders written by `ddpm export` can be imported"
        )
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
        num_classes=null_class or 0,
    )
    return model, size, unet_cfg["in_channels"]


def diffusion_config_from_diffusers(sched: dict, recorded: dict | None = None) -> DiffusionConfig:
    """Our chain for a diffusers DDPMScheduler config. Its ``trained_betas`` are taken only as the
    schedule ``recorded`` (the diffusion section `ddpm export` wrote beside them) when they are its betas."""
    if sched.get("rescale_betas_zero_snr"):
        raise CheckpointError(
            "schedulers with rescale_betas_zero_snr cannot be imported (not the paper's betas)"
        )
    if sched.get("trained_betas") is not None:
        return _recorded_schedule(sched["trained_betas"], recorded)
    schedules = {theirs: ours for ours, theirs in _SCHEDULES.items()}
    variances = {theirs: ours for ours, theirs in _VARIANCES.items()}
    variances |= {f"{theirs}_log": ours for theirs, ours in variances.items()}
    predictions = {theirs: ours for ours, theirs in _PREDICTIONS.items()}
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


def _recorded_schedule(trained_betas, recorded: dict | None) -> DiffusionConfig:
    from .schedules import make_betas

    problem = "schedulers with trained_betas can be imported only from `ddpm export`, whose record names them"
    try:
        cfg = DiffusionConfig(**recorded)
        betas = make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        same = np.allclose(betas, np.asarray(trained_betas, dtype=np.float64))
    except Exception:  # no record, or one of another form
        raise CheckpointError(problem) from None
    if not same:
        raise CheckpointError(f"{problem}; these are not the recorded {cfg.beta_schedule} schedule's")
    return cfg


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

    exported = _read_json(folder / EXPORT_RECORD) if (folder / EXPORT_RECORD).is_file() else {}
    model_cfg, size, channels = model_config_from_diffusers(unet_cfg, exported.get("null_class"))
    recorded = (
        exported.get("config", {}).get("diffusion") if isinstance(exported.get("config"), dict) else None
    )
    diffusion_cfg = diffusion_config_from_diffusers(sched, recorded)
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
    data = DataConfig(dataset=dataset, image_size=size, channels=channels)
    if model_cfg.num_classes:  # the class names `ddpm export` recorded, which sampling's --class takes
        names = tuple(exported.get("class_names") or ())
        data = DataConfig(
            dataset=dataset, image_size=size, channels=channels, labels="classes", class_names=names
        )
    cfg = Config(
        name=f"imported:{folder.name}",
        model=model_cfg,
        diffusion=diffusion_cfg,
        data=data,
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


# ---- export: a run as a diffusers DDPMPipeline folder ----


def _diffusers_name(name: str) -> str:
    """Our UNet parameter name -> diffusers UNet2DModel's (the inverse of :func:`_rename`)."""
    prefix, _, leaf = name.rpartition(".")
    top = {ours: theirs for theirs, ours in _TOP.items()}
    if prefix in top:
        return f"{top[prefix]}.{leaf}"
    resnet = {ours: theirs for theirs, ours in _RESNET.items()}
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    if m := re.fullmatch(r"(down|up)\.(\d+)\.resample\.(.+)", prefix):
        path, level, layer = m.groups()
        return f"{path}_blocks.{level}.{path}samplers.0.{layer}.{leaf}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(blocks|attns)\.(\d+)\.(.+)", prefix):
        path, level, group, index, layer = m.groups()
        base = f"{path}_blocks.{level}.{'resnets' if group == 'blocks' else 'attentions'}.{index}"
    elif m := re.fullmatch(r"(mid_block1|mid_block2|mid_attn)\.(.+)", prefix):
        block, layer = m.groups()
        group = "attentions" if block == "mid_attn" else "resnets"
        base = f"mid_block.{group}.{'1' if block == 'mid_block2' else '0'}"
    else:
        return name  # conv_in, conv_out
    names = attention if "attentions" in base else resnet
    return f"{base}.{names.get(layer, layer)}.{leaf}"


def unet_state_dict_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a :class:`ddpm.unet.UNet` state dict onto diffusers UNet2DModel names and shapes; a parameter
    with no counterpart there is refused (each name must map back to itself on import)."""
    out = {}
    for name, tensor in state.items():
        theirs = _diffusers_name(name)
        ours, is_projection = _rename(theirs)
        if ours != name:
            raise CheckpointError(f"the network's {name} has no counterpart in a diffusers UNet2DModel")
        if is_projection and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out[theirs] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def diffusers_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """The diffusers DDPMScheduler config of our chain (the inverse of diffusion_config_from_diffusers);
    betas of a schedule diffusers does not name travel as its ``trained_betas``."""
    from .schedules import make_betas

    variance = _VARIANCES.get(diffusion.var_type)
    prediction = _PREDICTIONS.get(diffusion.mean_type)
    if variance is None:
        raise CheckpointError(
            f"a {diffusion.var_type} variance cannot be exported: DDPMScheduler's learned variances are "
            "not this network's (export a run with var_type fixedsmall or fixedlarge)",
            field="var_type",
        )
    if prediction is None:
        raise CheckpointError(
            f"a model predicting {diffusion.mean_type} cannot be exported: DDPMScheduler takes eps, x0 or v"
        )
    config = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": diffusion.num_timesteps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "variance_type": variance,
        "prediction_type": prediction,
        "clip_sample": True,  # Algorithm 2 as the paper's code runs it: x0 clipped to [-1, 1]
        "clip_sample_range": 1.0,
    }
    if diffusion.beta_schedule in _SCHEDULES:
        config["beta_schedule"] = _SCHEDULES[diffusion.beta_schedule]
    else:
        betas = make_betas(
            diffusion.beta_schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
        )
        config |= {"beta_schedule": "linear", "trained_betas": [float(b) for b in betas]}
    return config


def _exportable(cfg: Config) -> None:
    """Refuse, in one line, a run whose network DDPMPipeline cannot run."""
    from .build import require_pixel_diffusion

    require_pixel_diffusion(cfg, "export")
    model = cfg.model
    if model.kind != "unet":
        raise CheckpointError(f"only U-Net runs can be exported to diffusers, not a {model.kind} run")
    if model.text_encoder or model.context_dim:
        raise CheckpointError(
            "a text-conditional run cannot be exported: DDPMPipeline and UNet2DModel take no text "
            "(use ddpm sample or ddpm generate)"
        )
    if model.low_res:
        raise CheckpointError("a super-resolution run cannot be exported: UNet2DModel takes no low-res image")
    if not model.resamp_with_conv:
        raise CheckpointError(
            "resamp_with_conv=false cannot be exported: UNet2DModel always resamples with a convolution"
        )


def export_diffusers(
    checkpoint: str | Path, out_dir: str | Path, use_ema: bool = True, ema_width: float | None = None
) -> Path:
    """Write the run at ``checkpoint`` as a diffusers folder (model_index.json, unet/, scheduler/) that
    ``diffusers.DDPMPipeline.from_pretrained(out_dir)`` loads: the EMA weights by default (``use_ema``
    False: the raw ones; ``ema_width``: a kept EMA). A class-conditional run becomes a UNet2DModel with
    ``num_class_embeds`` = classes + 1 (the last id is the null class of classifier-free guidance), which
    is sampled with ``class_labels`` (DDPMPipeline passes none). Returns ``out_dir``."""
    from .build import load_model
    from .checkpoint import Checkpoint
    from .files import OutputFolder

    ckpt = Checkpoint(checkpoint)
    cfg = Config.from_dict(ckpt.config)
    _exportable(cfg)
    scheduler = diffusers_scheduler_config(cfg.diffusion)
    model, _, cfg = load_model(ckpt, use_ema, "cpu", None, ema_width)
    state = unet_state_dict_to_diffusers(model.state_dict())
    unet = {
        "_class_name": "UNet2DModel",
        **diffusers_unet_config(cfg.model, cfg.data.image_size, cfg.data.channels),
    }
    if cfg.model.num_classes:
        unet["num_class_embeds"] = cfg.model.num_classes + 1
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    record = {
        "checkpoint": str(ckpt.path.resolve()),
        "step": ckpt.train_state.get("step"),
        "weights": "model" if not use_ema else "ema" if ema_width is None else f"ema width {ema_width:g}",
        "null_class": cfg.model.num_classes or None,  # the class id that means "no class"
        "class_names": list(cfg.data.class_names) or None,
        "config": cfg.to_dict(),
    }
    out = OutputFolder(out_dir, last=EXPORT_RECORD)
    try:
        from safetensors.torch import save_file

        (out.staging / "unet").mkdir()
        (out.staging / "scheduler").mkdir()
        save_file(state, str(out.staging / "unet" / "diffusion_pytorch_model.safetensors"))
        write_json(out.staging / "unet" / "config.json", unet)
        write_json(out.staging / "scheduler" / "scheduler_config.json", scheduler)
        write_json(out.staging / "model_index.json", index)
        write_json(out.staging / EXPORT_RECORD, record)
        out.publish()
    except BaseException:
        out.discard()
        raise
    return Path(out_dir)
