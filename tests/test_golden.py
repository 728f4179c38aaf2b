"""Golden outputs: seeded training, every sampler, inversion, figures and the NLL bound stay bit-identical.

The reference digests in ``golden/reference.json`` were recorded with the code at commit 7a0de15 (before
the issue-9 restructuring moved anything) and must never be regenerated from later code: a change that
has to alter them says so in its note and records them again deliberately.

Exact equality holds for the torch version and machine they were recorded on (the CI machine). Under
another torch or CPU, float kernels may round differently, so the test then compares per-output sums
with a relative tolerance instead.
"""

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch
from conftest import make_idx_dir, tiny_config

import ddpm
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_betas

REFERENCE = Path(__file__).parent / "golden" / "reference.json"


def digest(*tensors: torch.Tensor) -> dict:
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


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    """The tiny Fashion-MNIST-like IDX directory of conftest's ``idx_dir``, shared by this module."""
    return make_idx_dir(tmp_path_factory.mktemp("golden") / "idx")


@pytest.fixture(scope="module")
def outputs(golden_data, tmp_path_factory):
    """Every golden output of the current code, computed once."""
    from ddpm.figures import interpolate, progressive, shared_latents
    from ddpm.likelihood import evaluate_nll
    from ddpm.samplers import ddim_invert, ddim_sample_loop

    root = tmp_path_factory.mktemp("runs")
    out = {}

    # Training: 6 steps with dropout 0.1 (the step's dropout seed), warm-up, clipping, EMA; fp32 and bf16.
    for precision in ("fp32", "bf16"):
        run = root / f"train-{precision}"
        ddpm.Trainer(tiny_config(golden_data, precision=precision), run, progress=False).train()
        ckpt = ddpm.Checkpoint(run)
        out[f"train_{precision}_model"] = state_digest(ckpt.model)
        out[f"train_{precision}_ema"] = state_digest(ckpt.ema)
        out[f"train_{precision}_optimizer"] = state_digest(ckpt.optimizer)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        out[f"train_{precision}_losses"] = digest(torch.tensor(losses, dtype=torch.float64))

    # The 2-D toy (MLP, points, never clipped).
    toy = ddpm.preset("toy2d")
    toy.data.num_points = 300
    toy.diffusion.num_timesteps = 40
    toy.train.__dict__.update(steps=4, batch_size=32, log_every=1, sample_every=4, num_sample_images=50)
    toy.train.device = "cpu"
    ddpm.Trainer(toy, root / "toy", progress=False).train()
    out["train_toy_ema"] = state_digest(ddpm.Checkpoint(root / "toy").ema)

    # Sampling from the trained fp32 run's EMA weights.
    model, diffusion, cfg = ddpm.load_model(root / "train-fp32")
    shape = (1, 8, 8)
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

    # The progressive chain of a respaced diffusion, as the README shows it.
    g = torch.Generator().manual_seed(3)
    steps = list(diffusion.respaced(10).p_sample_loop_progressive(model, (2, *shape), generator=g))
    out["progressive"] = digest(*(s.sample for s in steps), *(s.pred_x0 for s in steps))

    # DDIM inversion and regeneration on real images.
    from ddpm.sample import sampling_chain

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


def test_outputs_are_bit_identical_to_the_recorded_reference(outputs):
    reference = json.loads(REFERENCE.read_text())
    assert set(outputs) == set(reference["outputs"])
    exact = reference["torch"] == torch.__version__ and reference["machine"] == platform.machine()
    for name, ref in reference["outputs"].items():
        got = outputs[name]
        if exact:
            assert got["sha256"] == ref["sha256"], f"{name} changed (sums {got['sum']} vs {ref['sum']})"
        else:
            assert got["sum"] == pytest.approx(ref["sum"], rel=1e-3, abs=1e-4), name
            assert got["sum_abs"] == pytest.approx(ref["sum_abs"], rel=1e-3, abs=1e-4), name
