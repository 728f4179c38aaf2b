"""The paper's figures from a checkpoint: the forward process, progressive generation (Fig. 6), shared
latents (Fig. 7), interpolation (Fig. 8) and an animated denoising chain. Every figure is seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .build import load_network, require_pixel_diffusion
from .conditioning import check_request, make_conditioner
from .config import DataConfig
from .data import load_dataset
from .diffusion import GaussianDiffusion
from .errors import ConfigError, DataError
from .files import atomic_write, write_json
from .images import make_grid, to_model_range, to_uint8
from .rng import randn, sampling_generator
from .runtime import Runtime
from .samplers import ancestral_sample_loop, check_eta, get_sampler

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


def _complete(model, diffusion: GaussianDiffusion, x_t, t: int, sampler: str, g, device, **options):
    """x_t, at timestep t of ``diffusion``, carried to x0 by ``sampler``: Algorithm 2 from t (``options``:
    its ``shared_noise``), or the sampler on the chain's steps 0..t."""
    if sampler == "ancestral":
        return ancestral_sample_loop(
            diffusion, model, tuple(x_t.shape), generator=g, device=device, x_start=x_t, t_start=t, **options
        )
    chain = diffusion.respaced(list(range(t + 1)))
    return get_sampler(sampler).loop(chain, model, tuple(x_t.shape), generator=g, device=device, x_start=x_t)


@torch.no_grad()
def progressive(
    model, diffusion: GaussianDiffusion, n: int, shape, frames: int, g, device, sampler: str = "ancestral"
) -> tuple[list, list]:
    """Figure 6: x_t (top) and the predicted x0 (bottom) at ``frames`` times along one reverse chain of
    ``sampler`` (a name in ddpm.samplers.SAMPLERS) on ``diffusion``; x_t is the sample after the step
    from t."""
    keep = set(_times(diffusion.num_timesteps, frames))
    xs, x0s = [], []

    def record(step, t, x, pred_x0):
        if t in keep:
            xs.append(x.cpu())
            x0s.append(pred_x0.cpu())

    get_sampler(sampler).loop(diffusion, model, (n, *shape), generator=g, device=device, callback=record)
    # One row per sample, one column per time.
    return [torch.stack([x[i] for x in xs]) for i in range(n)], [
        torch.stack([x[i] for x in x0s]) for i in range(n)
    ]


@torch.no_grad()
def shared_latents(
    model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    times: list[int],
    n: int,
    g,
    device,
    sampler: str = "ancestral",
):
    """Figure 7: one x_t ~ q(x_t | x0) per t, completed ``n`` times by the reverse process (``sampler``'s;
    a deterministic one completes them all alike)."""
    rows = []
    for t in times:
        x_t = diffusion.q_sample(x0[None], torch.tensor([t]), randn(x0[None].shape, g, "cpu"))
        start = x_t.expand(n, *x0.shape).to(device)
        done = _complete(model, diffusion, start, t, sampler, g, device)
        rows.append(torch.cat([x0[None], done.cpu()]))
    return rows


@torch.no_grad()
def check_interpolation_sampler(sampler: str) -> None:
    if sampler != "ancestral" and check_eta(sampler, None) > 0:
        raise ConfigError(
            f"interpolation gives every mixture the same reverse noise, which the {sampler} sampler does "
            "not: use ancestral or a sampler without noise"
        )


def interpolate(
    model,
    diffusion: GaussianDiffusion,
    xa,
    xb,
    times: list[int],
    lambdas: list[float],
    g,
    device,
    sampler: str = "ancestral",
):
    """Figure 8: noise two images to t with q (shared noise), mix the latents, denoise each mixture
    with shared reverse noise (Algorithm 2's) or none (a deterministic ``sampler``)."""
    check_interpolation_sampler(sampler)
    rows = []
    for t in times:
        noise = randn(xa[None].shape, g, "cpu")
        tt = torch.tensor([t])
        za, zb = diffusion.q_sample(xa[None], tt, noise), diffusion.q_sample(xb[None], tt, noise)
        mixed = torch.cat([(1 - lam) * za + lam * zb for lam in lambdas]).to(device)
        # The same reverse noise for every lambda, so the row changes only through the latent.
        done = _complete(model, diffusion, mixed, t, sampler, g, device, shared_noise=True)
        rows.append(torch.cat([xa[None], done.cpu(), xb[None]]))
    return rows


@torch.no_grad()
def denoising_gif(
    model,
    diffusion: GaussianDiffusion,
    n: int,
    shape,
    frames: int,
    g,
    device,
    path: Path,
    sampler: str = "ancestral",
) -> None:
    """An animated reverse chain of ``sampler``: the samples at ``frames`` times, the last held."""
    keep = set(_times(diffusion.num_timesteps, frames))
    images = []

    def record(step, t, x, pred_x0):
        if t in keep:
            grid = make_grid(to_uint8(x.cpu()), padding=1)
            images.append(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid))

    get_sampler(sampler).loop(diffusion, model, (n, *shape), generator=g, device=device, callback=record)
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
    runtime: Runtime | None = None,
    data_dir: str | None = None,
    class_name: str | int | None = None,
    guidance: float = 0.0,
    prompt: str | None = None,
    sampler: str = "ancestral",
    progress: bool = False,
) -> dict:
    """Write the chosen figures (default: all) as PNG/GIF into ``out_dir``, plus figures.json.
    The network runs on ``runtime`` (default ``Runtime()``: auto, fp32; ``Runtime(precision="bf16")``
    runs it under bf16 autocast; see ``ddpm.runtime.Runtime``).
    Conditional runs draw ``class_name`` (the real images are then of that class) or ``prompt``, guided
    with w = ``guidance``, or the null condition's when none is given. The reverse process is
    ``sampler``'s (a name in ddpm.samplers.SAMPLERS; interpolation takes no SDE sampler)."""
    which = list(FIGURES) if not which else which
    unknown = set(which) - set(FIGURES)
    if unknown:
        raise ConfigError(f"unknown figure {sorted(unknown)[0]!r}; choose from {', '.join(FIGURES)}")
    if num < 2:
        raise ConfigError(f"num must be at least 2, got {num}", field="num")
    if frames < 2:
        raise ConfigError(f"frames must be at least 2, got {frames}", field="frames")
    get_sampler(sampler)
    if "interpolate" in which:
        check_interpolation_sampler(sampler)
    loaded = load_network(checkpoint, "ema" if use_ema else "model", runtime)
    diffusion, cfg, dev = loaded.diffusion, loaded.cfg, loaded.device
    require_pixel_diffusion(cfg, "ddpm figures")
    if cfg.model.kind != "unet":
        raise ConfigError("figures are drawn for image models; 2-D models plot their samples in samples/")
    index = check_request(cfg, class_name, guidance, prompt)
    conditioner = make_conditioner(cfg, loaded.checkpoint.path.parent)
    model = conditioner.for_one(loaded.network, index, guidance, prompt)
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
    from tqdm.auto import tqdm

    bar = tqdm(total=len(set(which)), desc="figures", unit="figure", disable=not progress)  # (with ETA)
    if "forward" in which:
        times = [0] + _times(T, frames)[::-1][1:]
        rows, snr = forward_process(diffusion, real[:num], times, _generator(seed, 1))
        _save_rows(rows, out / "forward.png")
        written["forward"] = {"file": "forward.png", "t": times, "snr": [float(f"{v:.4g}") for v in snr]}
        bar.update()
    if "progressive" in which:
        xs, x0s = progressive(model, diffusion, num, shape, frames, _generator(seed, 2), dev, sampler)
        _save_rows(xs, out / "progressive_xt.png")
        _save_rows(x0s, out / "progressive_x0.png")
        written["progressive"] = {
            "files": ["progressive_xt.png", "progressive_x0.png"],
            "t": _times(T, frames),
        }
        bar.update()
    if "shared" in which:
        times = _times(T, 5)[1:]  # e.g. 750, 500, 250, 0: from far to near the data
        g = _generator(seed, 3)
        rows = shared_latents(model, diffusion, real[0], times, num - 1, g, dev, sampler)
        _save_rows(rows, out / "shared_latents.png")
        written["shared"] = {"file": "shared_latents.png", "t": times}
        bar.update()
    if "interpolate" in which:
        times = _times(T, 5)[1:]
        lambdas = np.linspace(0, 1, num).tolist()
        g = _generator(seed, 4)
        rows = interpolate(model, diffusion, real[0], real[1], times, lambdas, g, dev, sampler)
        _save_rows(rows, out / "interpolation.png")
        written["interpolate"] = {"file": "interpolation.png", "t": times, "lambdas": lambdas}
        bar.update()
    if "gif" in which:
        g, gif = _generator(seed, 5), out / "denoising.gif"
        denoising_gif(model, diffusion, num, shape, max(frames, 20), g, dev, gif, sampler)
        written["gif"] = {"file": "denoising.gif"}
        bar.update()
    bar.close()
    weights = "ema" if use_ema else "model"
    info = {
        "checkpoint": str(checkpoint),
        "seed": seed,
        "weights": weights,
        "sampler": sampler,
        **loaded.record(),
        **({"class": index, "guidance": guidance} if index is not None else {}),
        **({"prompt": prompt, "guidance": guidance} if prompt is not None else {}),
        **written,
    }
    write_json(out / "figures.json", info)
    return info
