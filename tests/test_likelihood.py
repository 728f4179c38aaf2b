import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpm.cli import main
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_betas
from ddpm.train import Trainer


def quantised_gaussian(n, mu=0.1, sigma=0.2, seed=0):
    """Data on the 256-level grid of [-1, 1]: N(mu, sigma^2) rounded to the nearest level, and the exact
    entropy (bits/dim) of that discrete distribution."""
    from math import erf

    levels = np.arange(256) / 127.5 - 1
    edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    cdf = np.array([0.5 * (1 + erf((e - mu) / (sigma * math.sqrt(2)))) for e in edges])
    probs = np.diff(cdf)
    rng = np.random.default_rng(seed)
    idx = rng.choice(256, size=n, p=probs)
    entropy = -(probs[probs > 0] * np.log2(probs[probs > 0])).sum()
    return torch.tensor(levels[idx], dtype=torch.float32)[:, None], entropy


def optimal_eps(d: GaussianDiffusion, mu: float, sigma: float):
    ab = torch.tensor(d.alphas_cumprod).float()

    def model(x, t):
        a = ab[t].reshape(-1, 1)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * sigma**2 + 1 - a)

    return model


def test_bound_with_the_optimal_model_is_close_to_and_above_the_true_nll():
    """Quantised Gaussian data, whose entropy is known exactly, and the optimal denoiser of the Gaussian.
    With fixed-large variances the bound lands ~0.12 bits/dim (2%) above the entropy here."""
    x0, entropy = quantised_gaussian(4000)
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedlarge")
    out = d.calc_bpd_loop(
        optimal_eps(d, 0.1, 0.2), x0, clip_denoised=False, generator=torch.Generator().manual_seed(0)
    )
    bound = out["total_bpd"].mean().item()
    stderr = out["total_bpd"].std().item() / math.sqrt(len(x0))
    assert bound >= entropy - 3 * stderr  # a bound on the NLL can never beat the data's entropy
    assert bound - entropy < 0.2  # and with the optimal denoiser it is close
    assert out["vb_bpd"].shape == (4000, 1000) and out["prior_bpd"].mean() < 1e-4


def test_subset_estimate_is_close_to_the_full_bound():
    x0, _ = quantised_gaussian(2000, seed=1)
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedlarge")
    model = optimal_eps(d, 0.1, 0.2)
    full = d.calc_bpd_loop(model, x0, False, torch.Generator().manual_seed(0))
    assert torch.equal(full["kl_weights"], torch.ones(1000))
    full = full["total_bpd"].mean()
    quadratic = sorted({round((i / 99) ** 2 * 999) for i in range(100)})
    est = d.calc_bpd_loop(model, x0, False, torch.Generator().manual_seed(0), timesteps=quadratic)
    assert est["kl_weights"].sum() == 1000 and est["vb_bpd"].shape[1] == len(quadratic)
    assert est["total_bpd"].mean().item() == pytest.approx(full.item(), rel=0.05)


def test_eval_nll_writes_bound_rate_and_distortion(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    assert main(["eval", "nll", str(run), "--num", "6", "--batch-size", "4", "--no-progress"]) == 0
    summary = json.loads((run / "nll-test" / "nll.json").read_text())
    assert summary["num_images"] == 6 and summary["estimate"] is False and summary["nll_bpd"] > 0
    assert summary["nll_bpd"] == pytest.approx(
        summary["rate_bpd"] + summary["distortion_bpd"], rel=1e-3
    )  # rate + distortion = total, as in the paper's 1.78 + 1.97 = 3.75
    rows = list(csv.DictReader(open(run / "nll-test" / "rate_distortion.csv")))
    assert len(rows) == 50 and rows[-1]["reverse_step"] == "50"
    rates = [float(r["rate_bpd"]) for r in rows]
    assert rates == sorted(rates)  # the rate only grows along the reverse process
    assert (run / "nll-test" / "rate_distortion.png").stat().st_size > 0
    capsys.readouterr()

    assert (
        main(
            [
                "eval",
                "nll",
                str(run),
                "--num",
                "4",
                "--estimate-steps",
                "5",
                "--out",
                str(tmp_path / "e"),
                "--no-progress",
            ]
        )
        == 0
    )
    estimate = json.loads((tmp_path / "e" / "nll.json").read_text())
    assert estimate["estimate"] is True and "ESTIMATE" in estimate["note"]
    assert main(["eval", "nll", str(run), "--estimate-steps", "1"]) == 2


def test_eval_nll_of_a_class_conditional_run_is_the_bound_given_the_class(class_run, tmp_path, capsys):
    from ddpm.build import load_model
    from ddpm.data import load_idx_dataset
    from ddpm.images import to_model_range
    from ddpm.rng import sampling_generator

    run, data = class_run
    images = load_idx_dataset("fashion-mnist", str(data), "test")
    labels = load_idx_dataset("fashion-mnist", str(data), "test", kind="labels")
    common = int(labels.mode().values)
    flags = ["--data-dir", str(data), "--no-progress", "--no-ema", "--batch-size", "10"]
    out = tmp_path / "c"
    assert main(["eval", "nll", str(run), *flags, "--class", str(common), "--out", str(out)]) == 0
    summary = json.loads((out / "nll.json").read_text())
    assert summary["class"] == common and summary["num_images"] == int((labels == common).sum())
    # the same bound computed directly: the network given the class, on that class's images only
    model, diffusion, _ = load_model(run, use_ema=False)
    x0 = to_model_range(images[labels == common])
    y = torch.full((len(x0),), common)
    with torch.no_grad():
        direct = diffusion.calc_bpd_loop(lambda x, t: model(x, t, y), x0, True, sampling_generator(0, 0))
    assert summary["nll_bpd"] == pytest.approx(direct["total_bpd"].mean().item(), abs=1e-4)
    capsys.readouterr()
    absent = next(c for c in range(10) if (labels == c).sum() == 0)
    assert main(["eval", "nll", str(run), *flags, "--class", str(absent), "--out", str(tmp_path / "x")]) == 2
    assert "has no images of class" in capsys.readouterr().err


def test_eval_nll_takes_the_speed_options_of_sample(class_run, tmp_path, wrap_calls):
    """--channels-last, --compile and --compile-mode reach the network (through wrap_network) and
    nll.json, as `ddpm sample`'s do; on a CPU, channels_last gives the bound the default layout does."""

    run, data = class_run
    seen = wrap_calls
    flags = ["--num", "3", "--data-dir", str(data), "--device", "cpu", "--precision", "bf16", "--no-progress"]
    assert main(["eval", "nll", str(run), *flags, "--out", str(tmp_path / "plain")]) == 0
    assert seen == [(torch.device("cpu"), "bf16", False, False, "default")]
    speed = ["--channels-last", "--compile", "--compile-mode", "reduce-overhead"]
    assert main(["eval", "nll", str(run), *flags, *speed, "--out", str(tmp_path / "fast")]) == 0
    assert seen[1:] == [(torch.device("cpu"), "bf16", True, True, "reduce-overhead")]
    plain, fast = (json.loads((tmp_path / n / "nll.json").read_text()) for n in ("plain", "fast"))
    assert fast["channels_last"] is True and fast["compile"] == "reduce-overhead"
    assert "channels_last" not in plain and plain["precision"] == fast["precision"] == "bf16"
    for key in ("nll_bpd", "prior_bpd", "rate_bpd", "distortion_bpd", "distortion_rmse_0_255"):
        assert fast[key] == pytest.approx(plain[key], rel=1e-3), key
