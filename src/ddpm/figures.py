"""The paper's figures from a checkpoint: the forward process, progressive generation (Fig. 6), shared
latents (Fig. 7), interpolation (Fig. 8) and an animated denoising chain. Every figure is seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .build import load_model, require_pixel_diffusion
from .conditions import check_request, for_request
from .config import DataConfig
from .data import load_dataset
from .diffusion import GaussianDiffusion
from .errors import ConfigError, DataError
from .files import atomic_write, write_json
from .images import make_grid, to_model_range, to_uint8
from .rng import randn, sampling_generator
from .runtime import resolve_device, wrap_network
from .samplers import ancestral_progressive, ancestral_sample_loop

FIGURES = ("forward", "progressive", "shared", "interpolate", "gif")


def _generator(seed: int, figure: int) -> torch.Generator:
    # Index 1000 + figure: the stream a sample batch of that index would use (as the figures always did).
    return sampling_generator(seed, 1_000 + figure)


def _times(T: int, count: int) -> list[int]:
    """``count`` code timesteps from T-1 down to 0, evenly spaced."""
    return sorted({round(i * (T - 1) / (count - 1)) for i in range(count)}, reverse=True)


def _save_rows(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of [-1, 1] images [K, C, H, W] (same K) as one grid PNG, one row per list entry."""
    images = torch.cat([to_uint8(r) for r in rows])
    grid = make_grid(images, nrow=rows[0].shape[0])
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


@torch.no_grad()
def forward_process(diffusion: GaussianDiffusion, x0: torch.Tensor, times: list[int], g) -> tuple[list, list]:
    """Each image noised to each t by q(x_t | x0); returns rows (one per image) and the SNR of each column."""
    rows = []
    for image in x0:
        batch = image[None].expand(len(times), *image.shape)
        t = torch.tensor(times)
        rows.append(diffusion.q_sample(batch, t, randn(batch.shape, g, batch.device)))
    abar = diffusion.alphas_cumprod[times]
    return rows, (abar / (1 - abar)).tolist()


@torch.no_grad()
def progressive(
    model, diffusion: GaussianDiffusion, n: int, shape, frames: int, g, device
) -> tuple[list, list]:
    """Figure 6: x_t (top) and the predicted x0 (bottom) at ``frames`` times along one reverse chain."""
    keep = set(_times(diffusion.num_timesteps, frames))
    xs, x0s = [], []
    for step in ancestral_progressive(diffusion, model, (n, *shape), generator=g, device=device):
        if step.t in keep:
            xs.append(step.sample.cpu())
            x0s.append(step.pred_x0.cpu())
    # One row per sample, one column per time.
    return [torch.stack([x[i] for x in xs]) for i in range(n)], [
        torch.stack([x[i] for x in x0s]) for i in range(n)
    ]


@torch.no_grad()
def shared_latents(
    model, diffusion: GaussianDiffusion, x0: torch.Tensor, times: list[int], n: int, g, device
):
    """Figure 7: one x_t ~ q(x_t | x0) per t, completed ``n`` times by the reverse process."""
    rows = []
    for t in times:
        x_t = diffusion.q_sample(x0[None], torch.tensor([t]), randn(x0[None].shape, g, "cpu"))
        start = x_t.expand(n, *x0.shape).to(device)
        done = ancestral_sample_loop(
            diffusion, model, (n, *x0.shape), generator=g, device=device, x_start=start, t_start=t
        )
        rows.append(torch.cat([x0[None], done.cpu()]))
    return rows


@torch.no_grad()
def interpolate(
    model, diffusion: GaussianDiffusion, xa, xb, times: list[int], lambdas: list[float], g, device
):
    """Figure 8: noise two images to t with q (shared noise), mix the latents, denoise each mixture
    with shared reverse noise."""
    rows = []
    for t in times:
        noise = randn(xa[None].shape, g, "cpu")
        tt = torch.tensor([t])
        za, zb = diffusion.q_sample(xa[None], tt, noise), diffusion.q_sample(xb[None], tt, noise)
        mixed = torch.cat([(1 - lam) * za + lam * zb for lam in lambdas]).to(device)
        # The same reverse noise for every lambda, so the row changes only through the latent.
        done = ancestral_sample_loop(
            diffusion,
            model,
            tuple(mixed.shape),
            generator=g,
            device=device,
            x_start=mixed,
            t_start=t,
            shared_noise=True,
        )
        rows.append(torch.cat([xa[None], done.cpu(), xb[None]]))
    return rows


@torch.no_grad()
def denoising_gif(
    model, diffusion: GaussianDiffusion, n: int, shape, frames: int, g, device, path: Path
) -> None:
    keep = set(_times(diffusion.num_timesteps, frames))
    images = []
    for step in ancestral_progressive(diffusion, model, (n, *shape), generator=g, device=device):
        if step.t in keep:
            grid = make_grid(to_uint8(step.sample.cpu()), padding=1)
            images.append(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid))
    images += [images[-1]] * 10  # hold the final frame
    atomic_write(
        path,
        lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=80),
    )


def make_figures(
    checkpoint: str | Path,
    out_dir: str | Path,
    which: list[str] | None = None,
    seed: int = 0,
    num: int = 8,
    frames: int = 10,
    use_ema: bool = True,
    device: str = "auto",
    data_dir: str | None = None,
    precision: str = "fp32",
    class_name: str | int | None = None,
    guidance: float = 0.0,
    prompt: str | None = None,
) -> dict:
    """Write the chosen figures (default: all) as PNG/GIF into ``out_dir``, plus figures.json.
    ``precision="bf16"`` runs the network under bf16 autocast (see ``ddpm.runtime.wrap_network``).
    Conditional runs draw ``class_name`` (the real images are then of that class) or ``prompt``, guided
    with w = ``guidance``, or the null condition's when none is given."""
    which = list(FIGURES) if not which else which
    unknown = set(which) - set(FIGURES)
    if unknown:
        raise ConfigError(f"unknown figure {sorted(unknown)[0]!r}; choose from {', '.join(FIGURES)}")
    if num < 2 or frames < 2:
        raise ConfigError("--num and --frames must be at least 2")
    dev = resolve_device(device)
    model, diffusion, cfg = load_model(checkpoint, use_ema, dev)
    require_pixel_diffusion(cfg, "ddpm figures")
    if cfg.model.kind != "unet":
        raise ConfigError("figures are drawn for image models; 2-D models plot their samples in samples/")
    index = check_request(cfg, class_name, guidance, prompt)
    network = wrap_network(model, dev, precision)
    model = for_request(network, cfg, class_name, guidance, prompt, checkpoint)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    T = diffusion.num_timesteps
    written = {}
    needs_data = {"forward", "shared", "interpolate"} & set(which)
    if needs_data:
        data_cfg = DataConfig(**{**cfg.data.__dict__, "split": "test", "root": data_dir or cfg.data.root})
        dataset = load_dataset(data_cfg)
        data = dataset.data if index is None else dataset.data[dataset.labels == index]
        if len(data) < 2:
            name = cfg.data.class_names[index]
            raise DataError(f"the test split has fewer than 2 images of class {name!r}")
        picks = torch.randperm(len(data), generator=_generator(seed, 0))[: max(num, 2)]
        real = to_model_range(data[picks])
    out = Path(out_dir)  # made once the data is known to be there: a refusal leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    if "forward" in which:
        times = [0] + _times(T, frames)[::-1][1:]
        rows, snr = forward_process(diffusion, real[:num], times, _generator(seed, 1))
        _save_rows(rows, out / "forward.png")
        written["forward"] = {"file": "forward.png", "t": times, "snr": [float(f"{v:.4g}") for v in snr]}
    if "progressive" in which:
        xs, x0s = progressive(model, diffusion, num, shape, frames, _generator(seed, 2), dev)
        _save_rows(xs, out / "progressive_xt.png")
        _save_rows(x0s, out / "progressive_x0.png")
        written["progressive"] = {
            "files": ["progressive_xt.png", "progressive_x0.png"],
            "t": _times(T, frames),
        }
    if "shared" in which:
        times = _times(T, 5)[1:]  # e.g. 750, 500, 250, 0: from far to near the data
        rows = shared_latents(model, diffusion, real[0], times, num - 1, _generator(seed, 3), dev)
        _save_rows(rows, out / "shared_latents.png")
        written["shared"] = {"file": "shared_latents.png", "t": times}
    if "interpolate" in which:
        times = _times(T, 5)[1:]
        lambdas = np.linspace(0, 1, num).tolist()
        rows = interpolate(model, diffusion, real[0], real[1], times, lambdas, _generator(seed, 4), dev)
        _save_rows(rows, out / "interpolation.png")
        written["interpolate"] = {"file": "interpolation.png", "t": times, "lambdas": lambdas}
    if "gif" in which:
        denoising_gif(
            model, diffusion, num, shape, max(frames, 20), _generator(seed, 5), dev, out / "denoising.gif"
        )
        written["gif"] = {"file": "denoising.gif"}
    weights = "ema" if use_ema else "model"
    info = {
        "checkpoint": str(checkpoint),
        "seed": seed,
        "weights": weights,
        "precision": precision,
        **({"class": index, "guidance": guidance} if index is not None else {}),
        **({"prompt": prompt, "guidance": guidance} if prompt is not None else {}),
        **written,
    }
    write_json(out / "figures.json", info)
    return info
