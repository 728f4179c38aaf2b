"""Latent diffusion's use of a frozen autoencoder: ours (a `ddpm train-autoencoder` run) or a diffusers
``AutoencoderKL`` from a local folder, behind one interface; the dataset's latents encoded once.

A diffusion model trained on latents models ``scale * z`` with z drawn from the autoencoder's posterior
(its mean and log-variance are encoded once per image and orientation; a latent is drawn per step from the
step's generator), where ``scale`` makes those latents unit-variance. Sampling divides by the scale and
decodes; the latents are not clipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError, DataError
from .files import read_json

LATENT_SCALE_SAMPLES = 1024  # training images the latent scale is measured on
RUN_COPY = "autoencoder"  # a latent run keeps its autoencoder here, so that the run alone can sample


class FrozenAutoencoder:
    """``encode(x) -> (mean, logvar)`` and ``decode(z)`` for images in [-1, 1], in no-grad eval mode;
    ``scale`` (latents times it have unit variance), ``factor`` (image size / latent size),
    ``latent_channels``, ``channels`` and ``source`` (what to record)."""

    def __init__(self, module, scale: float, factor: int, latent_channels: int, channels: int, source: dict):
        self.module = module.eval().requires_grad_(False)
        self.scale, self.factor = scale, factor
        self.latent_channels, self.channels, self.source = latent_channels, channels, source
        self._diffusers = source["kind"] == "diffusers"

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._diffusers:
            dist = self.module.encode(x).latent_dist
            return dist.mean, dist.logvar
        return self.module.encode(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z).sample if self._diffusers else self.module.decode(z)

    def to(self, device) -> FrozenAutoencoder:
        self.module.to(device)
        return self


def load_autoencoder(spec: str | Path, device: str | torch.device = "cpu") -> FrozenAutoencoder:
    """The autoencoder at ``spec``: a run of `ddpm train-autoencoder` (its EMA weights and recorded
    scale), or a folder holding a diffusers AutoencoderKL (its config's scaling_factor)."""
    path = Path(spec)
    config = path / "config.json"
    if (path / "checkpoint.safetensors").is_file() or path.suffix == ".safetensors":
        return _load_ours(path, device)
    if config.is_file():
        return _load_diffusers(path, device)
    if not path.exists():
        raise ConfigError(
            f"autoencoder {spec} does not exist: train it first with `ddpm train-autoencoder --out {spec}` "
            "(in Python: ddpm.Trainer on an autoencoder config such as "
            "ddpm.preset('fashion-mnist-autoencoder'), into that folder), or name another autoencoder run "
            "or a diffusers AutoencoderKL folder"
        )
    raise ConfigError(
        f"{spec} holds no autoencoder (a `ddpm train-autoencoder` run or a diffusers AutoencoderKL)"
    )


def run_autoencoder(cfg, run_dir: str | Path, device: str | torch.device = "cpu") -> FrozenAutoencoder:
    """A latent diffusion run's autoencoder: its own copy (RUN/autoencoder), else the one its config
    names (a run whose copy is not written yet)."""
    copy = Path(run_dir) / RUN_COPY
    return load_autoencoder(copy if copy.is_dir() else cfg.model.autoencoder, device)


def keep_autoencoder(ae: FrozenAutoencoder, run_dir: str | Path) -> None:
    """Copy the autoencoder a latent run trains on into the run (RUN/autoencoder): of a train-autoencoder
    run its checkpoint and config, of a diffusers folder its files. Copied aside and renamed into place."""
    import shutil

    run_dir = Path(run_dir)
    copy, source = run_dir / RUN_COPY, Path(ae.source["path"])
    if copy.is_dir() or source.resolve() == copy.resolve():
        return
    if ae.source["kind"] == "ddpm":
        files = [source / "checkpoint.safetensors", source / "config.json"]
    else:
        files = [f for f in source.iterdir() if f.is_file()]
    aside = run_dir / f".{RUN_COPY}.tmp"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for f in files:
        if f.is_file():
            shutil.copy2(f, aside / f.name)
    aside.rename(copy)


def _load_ours(path: Path, device) -> FrozenAutoencoder:
    from .build import load_model
    from .checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    if ckpt.config.get("model", {}).get("kind") != "autoencoder":
        raise ConfigError(
            f"{path} is not an autoencoder run (model.kind is {ckpt.config['model'].get('kind')!r})"
        )
    scale = ckpt.train_state.get("latent_scale")
    if scale is None:
        raise ConfigError(
            f"autoencoder {path} has no recorded latent scale (train it with `ddpm train-autoencoder`)"
        )
    model, _, cfg = load_model(ckpt, device=device)
    source = {"kind": "ddpm", "path": str(ckpt.path.parent), "step": ckpt.train_state.get("step")}
    return FrozenAutoencoder(model, float(scale), model.factor, model.latent_channels, model.channels, source)


def _load_diffusers(path: Path, device) -> FrozenAutoencoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError(
            f"{path}: loading a diffusers AutoencoderKL needs diffusers (pip install diffusers)"
        ) from None
    from .safeload import DIFFUSERS_PICKLES, DIFFUSERS_SAFETENSORS, refuse_pickled_folder

    refuse_pickled_folder(path, DIFFUSERS_SAFETENSORS, DIFFUSERS_PICKLES, f"autoencoder {path}")
    try:
        config = read_json(path / "config.json", "autoencoder config", expect=dict)
        if config.get("_class_name") != "AutoencoderKL":
            raise ValueError(f"its config describes {config.get('_class_name')!r}, not an AutoencoderKL")
        # safetensors only: diffusers would otherwise unpickle diffusion_pytorch_model.bin
        module = AutoencoderKL.from_pretrained(str(path), use_safetensors=True).to(device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"autoencoder {path} cannot be loaded ({e})") from None
    c = module.config
    factor = 2 ** (len(c.block_out_channels) - 1)
    source = {"kind": "diffusers", "path": str(path)}
    return FrozenAutoencoder(
        module, float(c.scaling_factor), factor, c.latent_channels, c.in_channels, source
    )


@torch.no_grad()
def encode_images(ae: FrozenAutoencoder, images: torch.Tensor, batch_size: int = 256):
    """(mean, logvar) of model-range images, in batches."""
    means, logvars = [], []
    for chunk in images.split(batch_size):
        mean, logvar = ae.encode(chunk)
        means.append(mean.float())
        logvars.append(logvar.float())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def measure_scale(module, images: torch.Tensor, generator: torch.Generator) -> float:
    """1 / the standard deviation of latents drawn from ``module``'s posteriors of ``images`` (model
    range): the factor that gives a diffusion model unit-variance data (Rombach et al.)."""
    module = module.eval()
    mean, logvar = module.encode(images)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(mean)
    return float(1.0 / z.float().std())


@torch.no_grad()
def decode_latents(
    ae: FrozenAutoencoder, latents: torch.Tensor, device, batch_size: int = 256
) -> torch.Tensor:
    """Images in [-1, 1] (on the CPU) from sampled, scaled latents, in batches."""
    out = [
        ae.decode(chunk.to(device) / ae.scale).float().clamp(-1, 1).cpu()
        for chunk in latents.split(batch_size)
    ]
    return torch.cat(out)


def evaluate_reconstructions(
    run: str | Path,
    num: int = 1000,
    split: str = "test",
    data_dir: str | None = None,
    cache_dir=None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """How well the autoencoder at ``run`` reconstructs the first ``num`` images of ``split`` (from the
    posterior mean): mean absolute error and PSNR in 0..255 pixel units, and (Fashion-MNIST, MNIST) the
    domain FID of the reconstructions against the whole split, the cost of the decoder stage in the
    units the generators are measured in."""
    from .checkpoint import Checkpoint
    from .config import Config
    from .data import load_dataset
    from .images import to_model_range, to_uint8
    from .metrics import DOMAIN_DATASETS, evaluate_domain

    if num <= 0:
        raise ConfigError("the number of images to reconstruct must be positive")
    ae = load_autoencoder(run, device)
    data = Config.from_dict(Checkpoint(run).config).data
    data.split, data.labels = split, "none"
    if data_dir is not None:
        data.root = data_dir
    images = load_dataset(data).data[:num]
    mean, _ = encode_images(ae, to_model_range(images.to(device)))
    reconstructions = to_uint8(decode_latents(ae, mean * ae.scale, device))
    error = reconstructions.float() - images.float()
    mse = float((error**2).mean())
    result = {
        "autoencoder": ae.source,
        "split": split,
        "num_images": len(images),
        "mean_absolute_error": round(float(error.abs().mean()), 3),
        "psnr_db": round(10 * torch.log10(torch.tensor(255.0**2 / max(mse, 1e-12))).item(), 2),
        "latent_shape": [ae.latent_channels, images.shape[-2] // ae.factor, images.shape[-1] // ae.factor],
        "compression": round(
            images[0].numel() / (ae.latent_channels * (images.shape[-1] // ae.factor) ** 2), 2
        ),
    }
    if data.dataset in DOMAIN_DATASETS:
        domain = evaluate_domain(reconstructions, data.dataset, split, data.root, cache_dir, progress)
        result["reconstruction_domain_fid"] = domain["fid"]
        result["extractor"] = domain["extractor"]
    return result
