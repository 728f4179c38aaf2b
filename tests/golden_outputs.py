"""Compute the golden outputs (seeded training, every sampler, inversion, figures, the NLL bound) as digests.

Run as a script; it starts itself again under ``PINNED_ENV``::

    python tests/golden_outputs.py OUT.json [--perturb-ulp] [--unpinned]

Float kernels on a CPU are chosen by the machine: ATen dispatches by instruction set (AVX2 / AVX-512),
oneDNN and MKL choose their own code paths and blockings, and reductions split by the thread count. So the
same code and torch give different bits on two Xeons. The pin makes every float path the same on any x86-64
machine of this decade: one thread; ATen capped at AVX2; oneDNN switched off (convolutions and matmuls go
through ATen's own kernels and MKL), and capped at AVX2 besides for anything that reaches it; MKL's
conditional numerical reproducibility set to its COMPATIBLE branch (SSE2 without the approximate
rcpps / rsqrtps), the one branch Intel documents as giving the same results on Intel and other vendors'
CPUs: its AVX2 branch exists on Intel CPUs only, and an AMD EPYC silently ran MKL's own choice under it
(27 of 32 digests differed from a Xeon's). Environment variables only take effect before the libraries
start, hence the separate process.

``--perturb-ulp`` moves one weight of the trained fp32 model by one ulp before sampling (the golden test
shows that this is caught); ``--unpinned`` keeps the caller's threads and kernels (to show the pin matters).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# Every variable any of the float libraries reads to choose a code path or a thread count.
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
}


def digest(*tensors) -> dict:
    """sha256 of the raw bytes of the tensors, and their float64 sums (the tolerant fallback)."""
    h = hashlib.sha256()
    total, total_abs = 0.0, 0.0
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        total += t.double().sum().item()
        total_abs += t.double().abs().sum().item()
    return {"sha256": h.hexdigest(), "sum": total, "sum_abs": total_abs}


def state_digest(state: dict) -> dict:
    return digest(*(state[k] for k in sorted(state)))


def compute(root: Path, perturb_ulp: bool = False) -> dict:
    """Every golden output of the current code (with ``perturb_ulp``: only fp32 training and the bound)."""
    import torch
    from conftest import make_idx_dir, tiny_config

    import ddpm
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.figures import interpolate, progressive, shared_latents
    from ddpm.likelihood import evaluate_nll
    from ddpm.sample import sampling_chain
    from ddpm.samplers import ddim_invert, ddim_sample_loop
    from ddpm.schedules import make_betas

    golden_data = make_idx_dir(root / "idx")
    out = {}

    # Training: 6 steps with dropout 0.1 (the step's dropout seed), warm-up, clipping, EMA; fp32 and bf16.
    for precision in ("fp32",) if perturb_ulp else ("fp32", "bf16"):
        run = root / f"train-{precision}"
        ddpm.Trainer(tiny_config(golden_data, precision=precision), run, progress=False).train()
        ckpt = ddpm.Checkpoint(run)
        out[f"train_{precision}_model"] = state_digest(ckpt.model)
        out[f"train_{precision}_ema"] = state_digest(ckpt.ema)
        out[f"train_{precision}_optimizer"] = state_digest(ckpt.optimizer)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[f"train_{precision}_losses"] = digest(torch.tensor(losses, dtype=torch.float64))

    # Sampling from the trained fp32 run's EMA weights.
    model, diffusion, cfg = ddpm.load_model(root / "train-fp32")
    shape = (1, 8, 8)
    if perturb_ulp:
        with torch.no_grad():
            # the first convolution kernel's first weight: every pixel of the input passes it, so the
            # change reaches the outputs through some rounding (one weight of the time embedding's first
            # layer reached them under MKL's AVX2 branch, with FMA, but not under the SSE2 one)
            kernel = next(p for p in model.parameters() if p.dim() == 4).view(-1)
            kernel[0] = torch.nextafter(kernel[0], torch.tensor(float("inf")))
        # Samples are quantised to 8 bits and hide so small a change; the bound's terms are not.
        x0 = ddpm.to_model_range(ddpm.load_dataset(cfg.data).data[:3])
        bpd = diffusion.calc_bpd_loop(
            model, x0, clip_denoised=True, generator=torch.Generator().manual_seed(11)
        )
        out["nll_terms"] = digest(bpd["total_bpd"], bpd["prior_bpd"], bpd["vb_bpd"], bpd["x0_mse"])
        return out

    # The 2-D toy (MLP, points, never clipped).
    toy = ddpm.preset("toy2d")
    toy.data.num_points = 300
    toy.diffusion.num_timesteps = 40
    toy.train.__dict__.update(steps=4, batch_size=32, log_every=1, sample_every=4, num_sample_images=50)
    toy.train.device = "cpu"
    ddpm.Trainer(toy, root / "toy", progress=False).train()
    out["train_toy_ema"] = state_digest(ddpm.Checkpoint(root / "toy").ema)

    settings = {
        "ancestral_all": dict(),
        "ancestral_10": dict(steps=10),
        "ancestral_10_trailing": dict(steps=10, spacing="trailing"),
        "ancestral_noclip": dict(steps=10, clip_denoised=False),
        "ancestral_bf16": dict(steps=10, precision="bf16"),
        "ddim_eta0": dict(sampler="ddim", steps=10),
        "ddim_eta05_leading": dict(sampler="ddim", steps=10, eta=0.5, spacing="leading"),
        "ddim_eta1_all": dict(sampler="ddim", eta=1.0),
        "dpmpp2m_logsnr": dict(sampler="dpm++2m", steps=8),
        "dpmpp2m_linspace": dict(sampler="dpm++2m", steps=8, spacing="linspace"),
        "dpmpp2m_trailing": dict(sampler="dpm++2m", steps=8, spacing="trailing"),
    }
    for name, kwargs in settings.items():
        x = ddpm.generate(model, diffusion, num=5, shape=shape, batch_size=3, seed=7, **kwargs)
        out[f"sample_{name}"] = digest(x)

    # The progressive chain of a respaced diffusion, as docs/python-api.md shows it.
    g = torch.Generator().manual_seed(3)
    steps = list(diffusion.respaced(10).p_sample_loop_progressive(model, (2, *shape), generator=g))
    out["progressive"] = digest(*(s.sample for s in steps), *(s.pred_x0 for s in steps))

    # DDIM inversion and regeneration on real images.
    x0 = ddpm.to_model_range(ddpm.load_dataset(cfg.data).data[:3])
    chain = sampling_chain(diffusion, "ddim", 10, "logsnr")
    latents = ddim_invert(chain, model, x0)
    out["invert_latents"] = digest(latents)
    out["invert_back"] = digest(ddim_sample_loop(chain, model, tuple(x0.shape), eta=0.0, x_start=latents))

    # The paper's figures' chains.
    gen = torch.Generator().manual_seed(5)
    xs, x0s = progressive(model, diffusion, 2, shape, 4, gen, "cpu")
    out["figure_progressive"] = digest(*xs, *x0s)
    out["figure_shared"] = digest(*shared_latents(model, diffusion, x0[0], [30, 10, 0], 2, gen, "cpu"))
    out["figure_interpolate"] = digest(
        *interpolate(model, diffusion, x0[0], x0[1], [20, 5], [0.0, 0.5, 1.0], gen, "cpu")
    )

    # The variational bound (Eq. 5) of a fixed batch, term by term, and the `eval nll` summary.
    gen = torch.Generator().manual_seed(11)
    bpd = diffusion.calc_bpd_loop(model, x0, clip_denoised=True, generator=gen)
    out["nll_terms"] = digest(bpd["total_bpd"], bpd["prior_bpd"], bpd["vb_bpd"], bpd["x0_mse"])
    summary = evaluate_nll(root / "train-fp32", root / "nll", num_images=6, batch_size=4, progress=False)
    out["nll_summary"] = digest(
        torch.tensor([summary[k] for k in ("nll_bpd", "prior_bpd", "rate_bpd", "distortion_bpd")])
    )

    # A learned-range variance with the hybrid loss and the x0 / v parameterisations, on a fixed net.
    torch.manual_seed(0)
    net = ddpm.UNet(
        in_channels=1, out_channels=2, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4
    )
    for mean_type in ("eps", "x0", "v", "xprev"):
        d = GaussianDiffusion(make_betas("linear", 30), mean_type, "learned_range", "hybrid")
        t, noise = (
            torch.tensor([0, 7, 29]),
            torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)),
        )
        losses = d.training_losses(net, x0, t, noise)
        gen = torch.Generator().manual_seed(2)
        x = ddpm.generate(net, d, num=2, shape=shape, seed=1, steps=6)
        bpd = d.calc_bpd_loop(net, x0[:2], generator=gen)
        out[f"learned_{mean_type}"] = digest(losses["loss"], losses["vb"], x, bpd["total_bpd"])
    return out


def pin_in_process() -> None:
    """What the environment cannot say: one thread, and no oneDNN (its kernels are chosen per machine)."""
    import torch

    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False


def main(argv: list[str]) -> int:
    out_path = Path(argv[0])
    unpinned = "--unpinned" in argv
    if not unpinned:
        if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
            # The libraries read these once, when they load: start again with them set.
            os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **PINNED_ENV})
        pin_in_process()
    import platform

    import torch

    import ddpm

    with tempfile.TemporaryDirectory() as tmp:
        outputs = compute(Path(tmp), perturb_ulp="--perturb-ulp" in argv)
    record = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "pinned": not unpinned,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "package": str(Path(ddpm.__file__).parent),
        "outputs": outputs,
    }
    out_path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's fixtures
    sys.exit(main(sys.argv[1:]))
