"""Sampling from a trained model: ``generate`` draws samples in seeded batches; ``sample_to_dir`` loads a
checkpoint, samples with a ``SampleOptions`` and writes the images and how they were made."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .build import load_model
from .checkpoint import Checkpoint
from .diffusion import GaussianDiffusion
from .errors import ConfigError
from .files import OutputFolder, write_json
from .images import plot_points, save_grid, save_npz, save_pngs, to_uint8
from .rng import sampling_generator
from .runtime import Processes, init_processes, resolve_device, wrap_network
from .samplers import check_eta, get_sampler, sampling_chain

__all__ = ["SampleOptions", "generate", "load_model", "sample_to_dir", "sampling_chain"]


@dataclass
class SampleOptions:
    """How to sample: what ``ddpm sample`` and ``ddpm eval fid RUN`` take, in one place."""

    num: int = 64
    batch_size: int = 64
    seed: int = 0
    steps: int | None = None  # timesteps on the respaced chain; None = all T
    sampler: str = "ancestral"  # a name in ddpm.samplers.SAMPLERS
    eta: float = 0.0  # DDIM's noise level
    spacing: str | None = None  # None = the sampler's default (ddpm.samplers.DEFAULT_SPACING)
    clip_denoised: bool | None = None  # None = clip images to [-1, 1], never 2-D points
    use_ema: bool = True
    var_type: str | None = None  # swap fixedsmall <-> fixedlarge; None = the checkpoint's
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    progress: bool = True
    class_name: str | int | None = None  # class-conditional runs: a class name or index (None: unconditional)
    guidance: float = 0.0  # classifier-free guidance, Ho and Salimans' w (0: plain conditional sampling)


@torch.inference_mode()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    num: int,
    shape: tuple[int, ...],
    batch_size: int = 64,
    seed: int = 0,
    steps: int | None = None,
    clip_denoised: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
    precision: str = "fp32",
    sampler: str = "ancestral",
    eta: float = 0.0,
    spacing: str | None = None,
    procs: Processes | None = None,
) -> torch.Tensor | None:
    """``num`` samples of per-example ``shape`` with ``sampler`` (default: Algorithm 2), on ``steps``
    timesteps picked by ``spacing`` when given (see ``sampling_chain``). Batch b has its own generator
    derived from (seed, b), so a seed and batch size always give the same samples, and different seeds
    never share a batch.
    Returns float samples in the data range.

    With ``procs`` (several processes under torchrun) process r draws the batches b with
    b % world_size == r, and the main process gathers them in order: the same samples as one process
    draws. The other processes return None.

    ``precision="bf16"`` runs the network under bf16 autocast (about 1.8x faster on this CPU); the
    chain's arithmetic stays in fp32. The default fp32 is the reference."""
    if num <= 0 or batch_size <= 0:
        raise ConfigError("the number of samples and the batch size must be positive")
    loop = get_sampler(sampler).loop
    chain = sampling_chain(diffusion, sampler, steps, spacing)
    network = wrap_network(model, device, precision)
    procs = procs or Processes()
    progress = progress and procs.is_main
    out = []
    count = (num + batch_size - 1) // batch_size
    batches = range(procs.rank, count, procs.world_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="batches", unit="batch")
    for b in batches:
        n = min(batch_size, num - b * batch_size)
        g = sampling_generator(seed, b)
        x = loop(
            chain,
            network,
            (n, *shape),
            generator=g,
            device=device,
            clip_denoised=clip_denoised,
            eta=eta,
            progress=progress,
        )
        out.append(x.float().cpu())
    if not procs.distributed:
        return torch.cat(out)
    parts = procs.gather(torch.cat(out) if out else torch.empty(0, *shape))
    if parts is None:
        return None
    # Rank r holds batches r, r + W, ...: put them back in the order of b.
    by_batch = {}
    for rank, part in enumerate(parts):
        sizes = [min(batch_size, num - b * batch_size) for b in range(rank, count, procs.world_size)]
        by_batch.update(zip(range(rank, count, procs.world_size), part.split(sizes), strict=True))
    return torch.cat([by_batch[b] for b in range(count)])


def sample_to_dir(
    checkpoint: str | Path, out_dir: str | Path, options: SampleOptions | None = None, **overrides
) -> dict | None:
    """Sample with ``options`` (fields may also be given as keywords) and write grid.png,
    images/NNNNNN.png and samples.npz (uint8 N,H,W,C), plus samples.json. For 2-D point models:
    points.npy and points.png. Under torchrun the processes share the batches and the main one
    writes; the others return None."""
    opts = dataclasses.replace(options or SampleOptions(), **overrides)
    get_sampler(opts.sampler)  # bad options fail before the checkpoint is loaded
    check_eta(opts.sampler, opts.eta)
    if opts.num <= 0 or opts.batch_size <= 0:
        raise ConfigError("the number of samples and the batch size must be positive")
    if not (math.isfinite(opts.guidance) and opts.guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {opts.guidance}")
    device = resolve_device(opts.device)
    procs = init_processes(device)
    ckpt = Checkpoint(checkpoint)
    model, diffusion, cfg = load_model(ckpt, opts.use_ema, device, opts.var_type)
    network = wrap_network(model, device, opts.precision, opts.channels_last, opts.compile)
    if opts.class_name is not None or opts.guidance:
        network = _conditioned(network, cfg, opts)
    clip_denoised = cfg.model.kind == "unet" if opts.clip_denoised is None else opts.clip_denoised
    if not procs.is_main:  # under torchrun: draw this process's batches for the main one to write
        _generate(network, diffusion, cfg, opts, clip_denoised, device, procs)
        return None
    out = OutputFolder(out_dir, last="samples.json")  # checked before the sampling, not after
    try:
        info = _sample_into(out.staging, ckpt, network, diffusion, cfg, opts, clip_denoised, device, procs)
        stale = out.stale(sorted(p.name for p in out.staging.iterdir()))
        if stale:  # e.g. images/ of an earlier image model beside this model's points
            info["removed_stale"] = stale
        write_json(out.staging / "samples.json", info)
        out.publish()
    except BaseException:
        out.discard()
        raise
    return info


def class_index(cfg, name: str | int) -> int:
    """The id of a class given by name or index, for a class-conditional run's config."""
    names = list(cfg.data.class_names)
    if str(name) in names:
        return names.index(str(name))
    if str(name).isdigit() and int(name) < cfg.model.num_classes:
        return int(name)
    raise ConfigError(f"unknown class {name!r}; this run's classes: {', '.join(names)}")


def _conditioned(network, cfg, opts: SampleOptions):
    """The network guided towards ``opts.class_name`` (classifier-free guidance; w = 0 is conditional)."""
    from .guidance import guided

    if cfg.model.num_classes == 0:
        raise ConfigError("this model is unconditional: --class and --guidance need a class-conditional run")
    if opts.class_name is None:
        raise ConfigError("--guidance needs --class (the class to guide towards)")
    index = class_index(cfg, opts.class_name)
    return guided(network, index, cfg.model.num_classes, opts.guidance)


def _shape(cfg) -> tuple[int, ...]:
    if cfg.model.kind == "unet":
        return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return (cfg.data.channels,)


def _generate(network, diffusion, cfg, opts: SampleOptions, clip_denoised, device, procs):
    return generate(
        network,
        diffusion,
        opts.num,
        _shape(cfg),
        opts.batch_size,
        opts.seed,
        opts.steps,
        clip_denoised,
        device,
        opts.progress,
        "fp32",  # the network is already wrapped for opts.precision
        opts.sampler,
        opts.eta,
        opts.spacing,
        procs,
    )


def _sample_into(
    folder: Path, ckpt, network, diffusion, cfg, opts: SampleOptions, clip_denoised, device, procs
) -> dict:
    is_image = cfg.model.kind == "unet"
    start = time.time()
    samples = _generate(network, diffusion, cfg, opts, clip_denoised, device, procs)
    out = folder
    if is_image:
        images = to_uint8(samples)
        save_grid(images, out / "grid.png")
        save_pngs(images, out / "images")
        save_npz(images, out / "samples.npz")
    else:
        np.save(out / "points.npy", samples.numpy())
        plot_points(samples, out / "points.png")
    info = {
        "checkpoint": str(ckpt.path),
        "dataset": cfg.data.dataset,
        "step": ckpt.train_state.get("step"),
        "weights": "ema" if opts.use_ema else "model",
        "num_samples": opts.num,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
        "sampler": opts.sampler,
        **({"eta": opts.eta} if opts.sampler == "ddim" else {}),
        **(
            {"class": class_index(cfg, opts.class_name), "guidance": opts.guidance}
            if opts.class_name is not None
            else {}
        ),
        "spacing": opts.spacing or get_sampler(opts.sampler).default_spacing,
        "var_type": cfg.diffusion.var_type,
        "steps": opts.steps or diffusion.num_timesteps,
        "clip_denoised": clip_denoised,
        "precision": opts.precision,
        **({"channels_last": True} if opts.channels_last else {}),
        **({"compile": True} if opts.compile else {}),
        **({"processes": procs.world_size} if procs.distributed else {}),
        "seconds": round(time.time() - start, 2),
    }
    return info
