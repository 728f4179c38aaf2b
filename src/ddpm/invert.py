"""DDIM inversion of real images: image -> latent x_T -> the same image again (eta = 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .build import load_network, require_pixel_diffusion
from .conditioning import check_request, make_conditioner
from .config import DataConfig
from .data import load_dataset
from .errors import ConfigError, DataError
from .files import write_json
from .images import GRID_LIMIT, load_samples, save_grid, to_model_range, to_uint8
from .runtime import Runtime
from .samplers import ddim_invert, ddim_sample_loop, get_sampler, sampling_chain


def invert_to_dir(
    checkpoint: str | Path,
    out_dir: str | Path,
    images: str | Path | None = None,
    num: int = 8,
    steps: int = 100,
    spacing: str | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    runtime: Runtime | None = None,
    data_dir: str | None = None,
    class_name: str | int | None = None,
    guidance: float = 0.0,
    prompt: str | None = None,
    progress: bool = False,
) -> dict:
    """Invert ``num`` images (the first of a samples.npz / its folder, or of the run's test split) to
    latents with DDIM on ``steps`` timesteps (picked by ``spacing``, default DDIM's linspace), regenerate
    them from those latents, and write latents.npy (float32 N,C,H,W), reconstruction.png (originals above,
    reconstructions below) and invert.json with the round-trip error on the 0..255 scale. Conditional runs
    invert and regenerate under ``class_name`` or ``prompt`` (guided with w = ``guidance``), or the null
    condition when none is given. The network runs on ``runtime`` (default ``Runtime()``: auto, fp32; see
    ``ddpm.runtime.Runtime``)."""
    if num <= 0:
        raise ConfigError(f"num must be positive, got {num}", field="num")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}", field="batch_size")
    loaded = load_network(checkpoint, "ema" if use_ema else "model", runtime)
    diffusion, cfg, dev = loaded.diffusion, loaded.cfg, loaded.device
    require_pixel_diffusion(cfg, "ddpm invert")
    if cfg.model.kind != "unet":
        raise ConfigError("inversion is for image models")
    index = check_request(cfg, class_name, guidance, prompt)
    if images is not None:
        originals = load_samples(images)[:num]
    else:
        data_cfg = DataConfig(**{**cfg.data.__dict__, "split": "test", "root": data_dir or cfg.data.root})
        originals = load_dataset(data_cfg).data[:num]
    expected = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if tuple(originals.shape[1:]) != expected:
        raise DataError(f"images have shape {tuple(originals.shape[1:])}; the model takes {expected}")
    spacing = spacing or get_sampler("ddim").default_spacing
    chain = sampling_chain(diffusion, "ddim", steps, spacing)
    conditioner = make_conditioner(cfg, loaded.checkpoint.path.parent)
    network = conditioner.for_one(loaded.network, index, guidance, prompt)
    latents, recon = [], []
    from tqdm.auto import tqdm

    starts = range(0, len(originals), batch_size)
    for start in tqdm(starts, desc="invert", unit="batch", disable=not progress):  # (with ETA)
        x0 = to_model_range(originals[start : start + batch_size]).to(dev)
        latent = ddim_invert(chain, network, x0, clip_denoised=True)  # as the generating loop below
        back = ddim_sample_loop(
            chain, network, tuple(x0.shape), device=dev, clip_denoised=True, x_start=latent
        )
        latents.append(latent.float().cpu())
        recon.append(to_uint8(back.float().cpu()))
    latents, recon = torch.cat(latents), torch.cat(recon)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", latents.numpy())
    shown = min(len(originals), GRID_LIMIT // 2)  # originals above, their reconstructions below
    save_grid(torch.cat([originals[:shown], recon[:shown]]), out / "reconstruction.png", nrow=shown)
    diff = recon.float() - originals.float()
    info = {
        "num_images": len(originals),
        "source": str(images) if images is not None else f"{cfg.data.dataset} test split",
        "steps": steps,
        "spacing": spacing,
        **loaded.record(),
        **({"class": index, "guidance": guidance} if index is not None else {}),
        **({"prompt": prompt, "guidance": guidance} if prompt is not None else {}),
        "rmse_0_255": round(diff.pow(2).mean().sqrt().item(), 3),
        "max_abs_error_0_255": int(diff.abs().max().item()),
        "latent_mean": round(latents.mean().item(), 4),
        "latent_std": round(latents.std().item(), 4),
    }
    write_json(out / "invert.json", info)
    return info
