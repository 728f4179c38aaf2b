"""`ddpm eval nll`: the negative log-likelihood bound in bits/dim and the rate/distortion view.

As in the paper: the sum of the T bound terms (the discretised decoder at t = 0, KLs for t > 0), each
with a fresh x_t, plus the prior term, with x0 clipped in the model mean by default. Rate and
distortion follow Table 4 / Figure 5: after reverse step k (code t = T - k), the rate is the prior plus
the KL terms received so far, and the distortion is the RMSE of the x0 predicted from x_t, on 0..255.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from .build import load_network, require_pixel_diffusion
from .conditioning import check_request, make_conditioner
from .config import DataConfig
from .data import load_dataset
from .errors import ConfigError, DataError
from .files import atomic_write, write_json
from .images import to_model_range
from .rng import sampling_generator
from .runtime import Runtime


def evaluate_nll(
    checkpoint: str | Path,
    out_dir: str | Path,
    split: str = "test",
    num_images: int | None = None,
    batch_size: int = 100,
    clip_denoised: bool = True,
    estimate_steps: int | None = None,
    seed: int = 0,
    use_ema: bool = True,
    runtime: Runtime | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    var_type: str | None = None,
    class_name: str | int | None = None,
    prompt: str | None = None,
) -> dict:
    """Bound on the NLL of the first ``num_images`` images of ``split``; writes nll.json, per_t.csv,
    rate_distortion.csv and rate_distortion.png into ``out_dir`` and returns the summary.
    Class-conditional runs: with ``class_name`` the bound on log p(x | class) over the split's images of
    that class; without, the null class's (the unconditional branch's) over all of them. Text-conditional
    runs: with ``prompt`` the bound on log p(x | prompt), else the empty text's. The network runs on
    ``runtime`` (default ``Runtime()``: auto, fp32; see ``ddpm.runtime.Runtime``)."""
    loaded = load_network(checkpoint, "ema" if use_ema else "model", runtime, var_type)
    diffusion, cfg, dev, ckpt = loaded.diffusion, loaded.cfg, loaded.device, loaded.checkpoint
    require_pixel_diffusion(cfg, "ddpm eval nll")
    if cfg.model.kind != "unet":
        raise ConfigError("the bits/dim bound is defined for 8-bit images, not for 2-D points")
    if num_images is not None and num_images <= 0:
        raise ConfigError(f"num_images must be positive, got {num_images}", field="num_images")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}", field="batch_size")
    index = check_request(cfg, class_name, prompt=prompt)
    data_cfg = DataConfig(**{**cfg.data.__dict__, "split": split, "root": data_dir or cfg.data.root})
    dataset = load_dataset(data_cfg)
    images = dataset.data if index is None else dataset.data[dataset.labels == index]
    if len(images) == 0:
        raise DataError(f"the {split} split has no images of class {cfg.data.class_names[index]!r}")
    images = images[:num_images] if num_images else images
    T = diffusion.num_timesteps
    timesteps = None
    if estimate_steps is not None:
        if not 2 <= estimate_steps <= T:
            raise ConfigError(
                f"estimate_steps must be in 2..{T}, got {estimate_steps}", field="estimate_steps"
            )
        # Quadratic spacing: the bound's terms change fastest at small t, so sample those densely.
        timesteps = sorted({round((i / (estimate_steps - 1)) ** 2 * (T - 1)) for i in range(estimate_steps)})
    net = make_conditioner(cfg, loaded.checkpoint.path.parent).for_one(loaded.network, index, prompt=prompt)

    totals, priors, vb_sum, mse_sum, kept, weights = [], [], None, None, None, None
    batches = range(math.ceil(len(images) / batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="nll batches", unit="batch")
    start = time.time()
    for b in batches:
        x0 = to_model_range(images[b * batch_size : (b + 1) * batch_size]).to(dev)
        g = sampling_generator(seed, b)
        out = diffusion.calc_bpd_loop(net, x0, clip_denoised, g, timesteps)
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        vb_sum = out["vb_bpd"].sum(0).cpu() + (0 if vb_sum is None else vb_sum)
        mse_sum = out["x0_mse"].sum(0).cpu() + (0 if mse_sum is None else mse_sum)
        kept, weights = out["timesteps"].tolist(), out["kl_weights"]
    n = len(images)
    total, prior = torch.cat(totals).double(), torch.cat(priors).double()
    vb_mean, mse_mean = (vb_sum / n).double(), (mse_sum / n).double()

    # Rate after each kept reverse step (from x_T down to t): prior + KL terms with t' >= max(t, 1).
    rows, rate = [], prior.mean().item()
    for j in reversed(range(len(kept))):
        if kept[j] > 0:
            rate += vb_mean[j].item() * weights[j].item()
        rows.append(
            {
                "reverse_step": T - kept[j],
                "t": kept[j],
                "term_bpd": vb_mean[j].item(),
                "rate_bpd": rate,
                "distortion_rmse_0_255": math.sqrt(mse_mean[j].item()) * 127.5,
            }
        )
    summary = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.train_state.get("step"),
        "weights": loaded.weights,
        "dataset": cfg.data.dataset,
        "split": split,
        **({"class": index, "class_name": cfg.data.class_names[index]} if index is not None else {}),
        **({"prompt": prompt} if prompt is not None else {}),
        "num_images": n,
        "nll_bpd": round(total.mean().item(), 5),
        "nll_bpd_stderr": round((total.std() / math.sqrt(n)).item(), 5) if n > 1 else None,
        "prior_bpd": prior.mean().item(),
        "rate_bpd": round(rate, 5),
        "distortion_bpd": round(vb_mean[0].item(), 5),  # the decoder term L_0
        "distortion_rmse_0_255": round(rows[-1]["distortion_rmse_0_255"], 5),
        "clip_denoised": clip_denoised,
        "var_type": cfg.diffusion.var_type,
        "estimate": timesteps is not None,
        "timesteps_evaluated": len(kept),
        **loaded.record(),
        "seed": seed,
        "seconds": round(time.time() - start, 1),
    }
    if timesteps is not None:
        summary["note"] = f"ESTIMATE: {len(kept) - 1} of {T - 1} KL terms, each weighted for its neighbours"
    write_outputs(Path(out_dir), summary, rows)
    return summary


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "nll.json", summary)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "rate_distortion.csv", write_csv)
    plot_rate_distortion(rows, out / "rate_distortion.png", summary)


def plot_rate_distortion(rows: list[dict], path: Path, summary: dict) -> None:
    """The paper's Figure 5: distortion and rate against reverse steps, and distortion against rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["reverse_step"] for r in rows]
    rate = [r["rate_bpd"] for r in rows]
    dist = [r["distortion_rmse_0_255"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    axes[0].plot(steps, dist)
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel="distortion (RMSE, 0..255)")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, dist)
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE, 0..255)")
    title = f"{summary['dataset']} {summary['split']}: NLL {summary['nll_bpd']:.3f} bits/dim"
    fig.suptitle(title + (" (estimate)" if summary["estimate"] else ""))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
