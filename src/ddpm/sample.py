"""Sampling from a trained model: ``generate`` draws samples in seeded batches; ``sample_to_dir`` loads a
checkpoint, samples with a ``SampleOptions`` and writes the images and how they were made."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .build import LoadedNetwork, load_model, load_network
from .checkpoint import Checkpoint
from .conditioning import (
    ConditionRequest,
    Guidance,
    LowResConditioner,
    autoguided,
    check_guidance,
    check_text,
    make_conditioner,
    with_condition,
)
from .config import check_seed
from .diffusion import GaussianDiffusion
from .errors import ConfigError
from .files import OutputFolder, write_json
from .images import plot_points, save_class_grid, save_grid, save_npz, save_pngs, to_uint8
from .rng import sampling_generator
from .runtime import Network, ProbedPrecision, Processes, Runtime, init_processes
from .samplers import ETA_DEFAULTS, check_eta, get_sampler, sampling_chain

__all__ = [
    "LoadedRun",
    "Request",
    "SampleOptions",
    "generate",
    "load_model",
    "load_run",
    "prepare",
    "sample_to_dir",
    "sampling_chain",
]


@dataclass
class SampleOptions:
    """How to sample: what ``ddpm sample`` and ``ddpm eval fid RUN`` take, in one place."""

    num: int = 64
    batch_size: int = 64
    seed: int = 0
    steps: int | None = None  # timesteps on the respaced chain; None = all T
    sampler: str = "ancestral"  # a name in ddpm.samplers.SAMPLERS
    eta: float | None = None  # the noise level of ddim (default 0) and the SDE solvers (default 1)
    spacing: str | None = None  # None = the sampler's default (SAMPLERS[name].default_spacing)
    clip_denoised: bool | None = None  # None = clip images to [-1, 1], never 2-D points
    use_ema: bool = True
    ema_width: float | None = None  # the EMA of this width the run kept (train.ema_widths); None: its EMA
    var_type: str | None = None  # swap fixedsmall <-> fixedlarge; None = the checkpoint's
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's; "reduce-overhead" replays CUDA graphs (a fixed batch)
    progress: bool = True
    # Class-conditional runs: a class name or index; None = every class, in equal blocks (a row each).
    class_name: str | int | None = None
    guidance: float = 0.0  # classifier-free guidance, Ho and Salimans' w (0: plain conditional sampling)
    guidance_interval: tuple[int, int] | None = None  # guide only at model timesteps lo..hi
    guidance_rescale: float = 0.0  # CFG rescale (Lin et al. 2024), 0 (off) to 1
    # Autoguidance (Karras et al. 2024): guide away from a weaker version of the model with this w (0: off;
    # (1 + w) * model - w * weaker), any run, with or without classifier-free guidance. The weaker model:
    # another checkpoint of the same network (an earlier one of the run), or None: the raw weights of
    # the one sampled (which is then its EMA).
    autoguidance: float = 0.0
    autoguide_from: str | Path | None = None
    # Text-conditional runs: the prompts (equal blocks, a grid row each; default: one per class where the
    # data has classes) and a negative prompt, the null branch of guidance (default: the empty text).
    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    # Super-resolution stages: the low-resolution images (samples.npz or its folder, or uint8
    # [N, C, H, W]; larger images are downsampled first) and their noise level (default: the stage's).
    low_res: str | Path | torch.Tensor | None = None
    low_res_noise: int | None = None

    @property
    def guidance_value(self) -> Guidance:
        """The guidance options as one value (scale, interval, rescale, negative prompt); bad ones are a
        one-line ConfigError."""
        return Guidance(self.guidance, self.guidance_interval, self.guidance_rescale, self.negative_prompt)

    def with_guidance(self, guidance: Guidance) -> SampleOptions:
        """These options with ``guidance`` (all four of its fields) in place of their own."""
        g = guidance
        return dataclasses.replace(
            self,
            guidance=g.w,
            guidance_interval=g.interval,
            guidance_rescale=g.rescale,
            negative_prompt=g.negative_prompt,
        )

    @property
    def runtime(self) -> Runtime:
        """Where and how the network runs (device, precision and the speed options) as one value;
        a bad precision or compile mode is a one-line ConfigError."""
        return Runtime(self.device, self.precision, self.channels_last, self.compile, self.compile_mode)


@torch.inference_mode()
def generate(
    model: nn.Module | Network,
    diffusion: GaussianDiffusion,
    num: int,
    shape: tuple[int, ...],
    batch_size: int = 64,
    seed: int = 0,
    steps: int | None = None,
    clip_denoised: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
    precision: str | None = "fp32",
    sampler: str = "ancestral",
    eta: float | None = None,
    spacing: str | None = None,
    procs: Processes | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``num`` samples of per-example ``shape`` with ``sampler`` (default: Algorithm 2), on ``steps``
    timesteps picked by ``spacing`` when given (see ``sampling_chain``). Batch b has its own generator
    derived from (seed, b), so a seed and batch size always give the same samples, and different seeds
    never share a batch.
    Returns float samples in the data range.

    With ``procs`` (several processes under torchrun) process r draws the batches b with
    b % world_size == r, and the main process gathers them in order: the same samples as one process
    draws. The other processes return None.

    ``cond``: a condition per sample ([num, ...], e.g. class ids); ``model`` is then called as
    ``model(x, t, cond)`` with each batch's rows.

    ``precision="bf16"`` runs the network under bf16 autocast (faster on some CPUs, slower on others);
    the chain's arithmetic stays in fp32. The default fp32 is the reference; "auto" times the first call
    in both and runs in the faster (``ProbedPrecision``). ``precision=None``: ``model`` is
    a network already wrapped for its runtime (``ddpm.build.load_network``, ``Runtime.wrap``), called as
    it is."""
    if num <= 0 or batch_size <= 0:
        raise ConfigError("the number of samples and the batch size must be positive")
    if cond is not None and len(cond) != num:
        raise ConfigError(f"{len(cond)} conditions for {num} samples")
    loop = get_sampler(sampler).loop
    chain = sampling_chain(diffusion, sampler, steps, spacing)
    network = model if precision is None else Runtime(device, precision).wrap(model)
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
        batch_network = network
        if cond is not None:
            batch_cond = cond[b * batch_size : b * batch_size + n].to(device)
            batch_network = with_condition(network, batch_cond)
        try:
            x = loop(
                chain,
                batch_network,
                (n, *shape),
                generator=g,
                device=device,
                clip_denoised=clip_denoised,
                eta=check_eta(sampler, eta),
                progress=progress,
            )
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU, a failed allocation on the CPU
            if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            raise ConfigError(
                f"out of memory sampling a batch of {n} on {device}: lower batch_size (now {batch_size})",
                field="batch_size",
            ) from None
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
    request = prepare(checkpoint, opts)
    if not request.procs.is_main:  # under torchrun: draw this process's batches for the main one to write
        request.draw()
        return None
    out = OutputFolder(out_dir, last="samples.json")  # checked before the sampling, not after
    try:
        start = time.time()
        samples = request.draw()
        info = {**request.record(), "seconds": round(time.time() - start, 2)}
        write_samples(out.staging, samples, request.labels, request.cfg, class_ids=request.class_ids)
        stale = out.stale(sorted(p.name for p in out.staging.iterdir()))
        if stale:  # e.g. images/ of an earlier image model beside this model's points
            info["removed_stale"] = stale
        write_json(out.staging / "samples.json", info)
        out.publish()
    except BaseException:
        out.discard()
        raise
    return info


@dataclass
class Request:
    """A checked sampling request: the loaded run, its network wrapped and conditioned as ``opts`` ask,
    and what each sample is conditioned on. ``draw()`` samples; ``record()`` says how (samples.json)."""

    ckpt: Checkpoint
    cfg: object
    diffusion: GaussianDiffusion
    network: object
    opts: SampleOptions
    clip_denoised: bool
    device: torch.device
    procs: Processes
    labels: torch.Tensor | None  # each sample's grid row (class id, or the index of its prompt)
    cond: object  # what the network is conditioned on, per sample
    conditions: dict  # how the conditions were chosen, for the record
    autoencoder: object = None  # a latent diffusion run's (FrozenAutoencoder): decodes the samples
    probed: ProbedPrecision | None = None  # precision "auto": what chose it (LoadedNetwork.probed)

    @property
    def class_ids(self) -> torch.Tensor | None:
        """Each sample's class, where its row is one (eval fid then scores class agreement)."""
        return self.labels if "classes" in self.conditions else None

    def draw(self) -> torch.Tensor | None:
        """The samples in the data range (None on the other processes under torchrun)."""
        opts = self.opts
        samples = generate(
            self.network,
            self.diffusion,
            opts.num,
            _shape(self.cfg),
            batch_size=opts.batch_size,
            seed=opts.seed,
            steps=opts.steps,
            clip_denoised=self.clip_denoised,
            device=self.device,
            progress=opts.progress,
            precision=None,  # wrapped for opts.runtime when it was loaded (load_network)
            sampler=opts.sampler,
            eta=opts.eta,
            spacing=opts.spacing,
            procs=self.procs,
            cond=self.cond,
        )
        if samples is None or self.autoencoder is None:
            return samples
        from .latent import decode_latents

        return decode_latents(self.autoencoder, samples, self.device, opts.batch_size)

    def _autoguidance(self) -> dict:
        opts = self.opts
        if not opts.autoguidance:
            return {}
        weaker = "model weights" if opts.autoguide_from is None else str(opts.autoguide_from)
        return {"autoguidance": opts.autoguidance, "autoguide_from": weaker}

    def record(self) -> dict:
        opts = self.opts
        return {
            "checkpoint": str(self.ckpt.path),
            "dataset": self.cfg.data.dataset,
            "step": self.ckpt.train_state.get("step"),
            "weights": "ema" if opts.use_ema else "model",
            **({"ema_width": opts.ema_width} if opts.ema_width is not None else {}),
            "num_samples": opts.num,
            "batch_size": opts.batch_size,
            "seed": opts.seed,
            "sampler": opts.sampler,
            **({"eta": check_eta(opts.sampler, opts.eta)} if opts.sampler in ETA_DEFAULTS else {}),
            "spacing": opts.spacing or get_sampler(opts.sampler).default_spacing,
            "var_type": self.cfg.diffusion.var_type,
            "steps": opts.steps or self.diffusion.num_timesteps,
            "clip_denoised": self.clip_denoised,
            **opts.runtime.record(self.probed),
            **self._autoguidance(),
            **({"processes": self.procs.world_size} if self.procs.distributed else {}),
            **({"autoencoder": self.autoencoder.source} if self.autoencoder is not None else {}),
            **self.conditions,
        }


def prepare(
    checkpoint: str | Path | Checkpoint,
    opts: SampleOptions,
    device: torch.device | None = None,
    procs: Processes | None = None,
    text_encoder=None,
) -> Request:
    """Check ``opts`` against the run at ``checkpoint`` and get its network ready (one-line errors for
    bad input, before anything is sampled or written). ``device`` replaces ``opts.device``;
    ``text_encoder``: the run's, where the caller has it loaded already (a pipeline's)."""
    return load_run(checkpoint, opts, device, procs).request(text_encoder=text_encoder)


def load_run(
    checkpoint: str | Path | Checkpoint,
    opts: SampleOptions,
    device: torch.device | None = None,
    procs: Processes | None = None,
) -> LoadedRun:
    """``prepare``'s first half: check ``opts``, and load the run's network for them, all but its
    conditions (``LoadedRun.request`` adds them)."""
    check_options(opts)  # bad options fail before the checkpoint is loaded
    runtime = opts.runtime if device is None else dataclasses.replace(opts.runtime, device=device)
    runtime = runtime.resolve()
    procs = procs or init_processes(runtime.device)
    weights = "ema" if opts.use_ema else "model"
    loaded = load_network(checkpoint, weights, runtime, opts.var_type, opts.ema_width)
    if opts.autoguidance:
        loaded = _autoguided(loaded, opts)
    cfg = loaded.cfg
    if cfg.model.kind == "autoencoder":
        raise ConfigError("this run is an autoencoder: sample a latent diffusion run trained on it")
    _check_against_run(loaded, opts)
    autoencoder = None
    if cfg.model.autoencoder:
        from .latent import run_autoencoder

        autoencoder = run_autoencoder(cfg, loaded.checkpoint.path.parent, loaded.device)
    return LoadedRun(loaded, opts, procs, autoencoder)


def _check_against_run(loaded: LoadedNetwork, opts: SampleOptions) -> None:
    cfg = loaded.cfg
    check_memory(opts.num, _shape(cfg), _image_shape(cfg) if cfg.model.autoencoder else None)
    sampling_chain(loaded.diffusion, opts.sampler, opts.steps, opts.spacing)  # bad steps or spacing: fail now


# The sampling options that decide how a run's network is loaded; the others are each request's.
LOADING_OPTIONS = ("use_ema", "ema_width", "var_type", "device", "precision", "channels_last", "compile")
LOADING_OPTIONS += ("compile_mode", "autoguidance", "autoguide_from")


class LoadedRuns:
    """Runs loaded once and reused by later requests that differ only in their per-request options
    (sampler, steps, seed, count, condition, guidance): what a server or a pipeline answering many
    requests holds. ``load`` is ``load_run`` with the same checks."""

    def __init__(self):
        self._runs: dict[tuple, LoadedRun] = {}

    def load(
        self,
        checkpoint: str | Path | Checkpoint,
        opts: SampleOptions,
        device: torch.device | None = None,
        procs: Processes | None = None,
    ) -> LoadedRun:
        path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        key = (str(path), str(device), *(str(getattr(opts, name)) for name in LOADING_OPTIONS))
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = load_run(checkpoint, opts, device, procs)
            return run
        check_options(opts)
        _check_against_run(run.loaded, opts)
        return dataclasses.replace(run, opts=opts)


@dataclass
class LoadedRun:
    """A run loaded to sample with ``opts``: its network on their runtime, not yet conditioned. A
    pipeline loads its decoder so before the generator has drawn the images that condition it."""

    loaded: LoadedNetwork
    opts: SampleOptions
    procs: Processes
    autoencoder: object = None  # a latent diffusion run's (FrozenAutoencoder): decodes the samples

    def request(self, low_res: torch.Tensor | None = None, text_encoder=None) -> Request:
        """The checked request: the network conditioned as the options ask, with ``low_res`` (uint8
        [N, C, H, W]) in place of ``opts.low_res`` where given, and ``text_encoder`` (the run's) used
        instead of loading it again."""
        opts = self.opts if low_res is None else dataclasses.replace(self.opts, low_res=low_res)
        loaded, cfg = self.loaded, self.loaded.cfg
        network, labels, cond, conditions = _conditioned(
            loaded.network,
            cfg,
            opts,
            loaded.diffusion,
            loaded.checkpoint,
            loaded.device,
            text_encoder,
        )
        clip_denoised = opts.clip_denoised
        if clip_denoised is None:  # images are bounded to [-1, 1]; 2-D points and latents are not
            clip_denoised = cfg.model.kind == "unet" and self.autoencoder is None
        return Request(
            loaded.checkpoint,
            cfg,
            loaded.diffusion,
            network,
            opts,
            clip_denoised,
            loaded.device,
            self.procs,
            labels,
            cond,
            conditions,
            self.autoencoder,
            loaded.probed,
        )

    def check_before_low_res(self) -> None:
        """What a super-resolution stage's request can be checked for before its low-resolution images
        exist (a pipeline's decoder, before the generator draws them): all but the images."""
        if self.loaded.cfg.model.low_res:
            LowResConditioner(self.loaded.cfg).check(
                _request(self.opts), self.opts.guidance_value, low_res_to_come=True
            )


def _autoguided(loaded: LoadedNetwork, opts: SampleOptions) -> LoadedNetwork:
    """``loaded`` with its network autoguided as ``opts`` ask, by the weaker model they name: another
    checkpoint of the same network (its EMA weights), or the raw weights of the one loaded."""
    if opts.autoguide_from is None and not opts.use_ema:
        raise ConfigError(
            "autoguidance of the raw weights needs a weaker model: give autoguide_from (an earlier "
            "checkpoint of the run)",
            field="autoguide_from",
        )
    source = loaded.checkpoint if opts.autoguide_from is None else opts.autoguide_from
    weaker = load_network(source, "model" if opts.autoguide_from is None else "ema", loaded.runtime)
    mine, theirs = loaded.cfg.to_dict(), weaker.cfg.to_dict()
    for section in ("model", "diffusion"):
        if mine[section] != theirs[section]:
            changed = sorted(k for k in mine[section] if mine[section][k] != theirs[section].get(k))
            raise ConfigError(
                f"autoguide_from {weaker.checkpoint.path} is another network ({section}.{changed[0]} "
                f"differs): autoguidance needs a weaker version of the same one",
                field="autoguide_from",
            )
    network = autoguided(loaded.network, weaker.network, opts.autoguidance)
    return dataclasses.replace(loaded, network=network)


def check_options(opts: SampleOptions) -> None:
    """What can be checked of ``opts`` without the run: one-line ConfigErrors."""
    get_sampler(opts.sampler)
    check_eta(opts.sampler, opts.eta)
    if opts.num <= 0 or opts.batch_size <= 0:
        raise ConfigError("the number of samples and the batch size must be positive")
    check_seed(opts.seed)
    _ = opts.guidance_value  # the guidance options as one value: checked when made (negative prompt too)
    check_guidance(opts.autoguidance, "autoguidance")
    if opts.low_res_noise is not None and opts.low_res_noise < 0:
        raise ConfigError(
            f"low_res_noise must be a noise level >= 0 (0 = clean), got {opts.low_res_noise}",
            field="low_res_noise",
        )
    if isinstance(opts.prompts, str):
        raise ConfigError("prompts must be a list of texts, not one text")
    for prompt in opts.prompts or ():
        check_text(prompt, "prompts")
    if opts.prompts and opts.num < len(opts.prompts):
        k = len(opts.prompts)
        raise ConfigError(
            f"num {opts.num} is fewer than the {k} prompts: each prompt gets an equal block of the "
            f"samples, so ask for at least {k} (a multiple of {k} for equal blocks)",
            field="num",
        )


def check_memory(num: int, shape: tuple[int, ...], decoded: tuple[int, ...] | None = None) -> None:
    """Refuse ``num`` samples of ``shape`` (and, decoded, of ``decoded``) that cannot fit in this
    machine's memory: they are gathered as float32 (the batches, then their concatenation) before any is
    written, so a count like 10**8 would otherwise sample for hours and then fail on an allocation."""
    total = _memory_bytes()
    if total is None:
        return
    per_sample = 8 * (math.prod(shape) + (math.prod(decoded) if decoded else 0))
    need = num * per_sample
    if need > total:
        size = "x".join(map(str, decoded or shape))
        raise ConfigError(
            f"num {num}: {num} samples of {size} take about {_gb(need)} of memory (float32, gathered "
            f"before they are written); this machine has {_gb(total)}: ask for at most "
            f"{total // per_sample} (several runs with different seeds make more)",
            field="num",
        )


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def write_samples(folder: Path, samples: torch.Tensor, labels, cfg, class_ids=None) -> None:
    """What `ddpm sample` writes: grid.png (a row per class or prompt where ``labels`` give them),
    images/NNNNNN.png and samples.npz (with ``class_ids``); for 2-D points, points.npy and points.png."""
    if cfg.model.kind == "unet":
        images = to_uint8(samples)
        if labels is None:
            save_grid(images, folder / "grid.png")
        else:
            save_class_grid(images, labels, folder / "grid.png")
        save_pngs(images, folder / "images")
        save_npz(images, folder / "samples.npz", class_ids)
    else:
        np.save(folder / "points.npy", samples.numpy())
        plot_points(samples, folder / "points.png")


def _conditioned(network, cfg, opts: SampleOptions, chain, ckpt, device, text_encoder=None):
    """The run's conditioner applied to ``opts``' request: the guided ``network(x, t, cond)`` (or the
    network itself), each sample's row (class id, or the index of its prompt), the conditions to feed
    and how they were chosen, for samples.json. A text-conditional run encodes with ``text_encoder``
    where given (its own, already loaded)."""
    conditioner = make_conditioner(cfg, ckpt.path.parent, text_encoder)
    return conditioner.for_samples(network, opts.num, opts.guidance_value, _request(opts), chain, device)


def _request(opts: SampleOptions) -> ConditionRequest:
    return ConditionRequest(opts.class_name, opts.prompts, opts.low_res, opts.low_res_noise, opts.seed)


def _image_shape(cfg) -> tuple[int, ...]:
    return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def _shape(cfg) -> tuple[int, ...]:
    if cfg.model.autoencoder:
        return (cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    if cfg.model.kind == "unet":
        return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return (cfg.data.channels,)
