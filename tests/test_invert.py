import numpy as np
import pytest
import torch

from ddpm.samplers import ddim_sample_loop


def test_invert_cli_writes_latents_that_regenerate_the_reconstruction(idx_dir, tmp_path, capsys):
    import json

    from conftest import tiny_config

    from ddpm.build import load_model
    from ddpm.cli import main
    from ddpm.images import to_uint8
    from ddpm.samplers import sampling_chain
    from ddpm.train import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    assert main(["invert", str(run), "--num", "3", "--steps", "6", "--data-dir", str(idx_dir)]) == 0
    info = json.loads((run / "inversion" / "invert.json").read_text())
    assert info["num_images"] == 3 and info["steps"] == 6 and info["spacing"] == "linspace"
    latents = torch.from_numpy(np.load(run / "inversion" / "latents.npy"))
    assert latents.shape == (3, 1, 8, 8) and latents.dtype == torch.float32
    # the latents regenerate exactly the reconstruction that the RMSE was measured on
    model, diffusion, _ = load_model(run)
    chain = sampling_chain(diffusion, "ddim", 6, "linspace")
    back = to_uint8(ddim_sample_loop(chain, model, (3, 1, 8, 8), x_start=latents))
    from ddpm.config import DataConfig
    from ddpm.data import load_dataset

    originals = load_dataset(DataConfig(root=str(idx_dir), image_size=8, split="test")).data[:3]
    rmse = (back.float() - originals.float()).pow(2).mean().sqrt().item()
    assert rmse == pytest.approx(info["rmse_0_255"], abs=0.01)

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, arr_0=np.zeros((2, 5, 5, 1), np.uint8))
    assert main(["invert", str(run), "--images", str(wrong)]) == 2
    assert "the model takes (1, 8, 8)" in capsys.readouterr().err


def test_invert_of_a_class_conditional_run_takes_a_class(class_run, tmp_path, capsys):
    import json

    from ddpm.cli import main

    run, data = class_run
    flags = ["--num", "2", "--steps", "5", "--data-dir", str(data), "--no-ema"]
    for name, extra in (("null", []), ("class", ["--class", "Trouser", "--guidance", "2"])):
        assert main(["invert", str(run), *flags, *extra, "--out", str(tmp_path / name)]) == 0
    info = json.loads((tmp_path / "class" / "invert.json").read_text())
    assert (
        info["class"] == 1
        and info["guidance"] == 2.0
        and "class" not in json.loads((tmp_path / "null" / "invert.json").read_text())
    )
    a, b = (np.load(tmp_path / n / "latents.npy") for n in ("null", "class"))
    assert not np.array_equal(a, b)  # inverted under another condition: other latents
    capsys.readouterr()
    assert main(["invert", str(run), *flags, "--class", "Hat", "--out", str(tmp_path / "x")]) == 2
    assert "unknown class 'Hat'" in capsys.readouterr().err


def test_invert_takes_the_speed_options_of_sample(class_run, tmp_path, wrap_calls):
    """--channels-last, --compile and --compile-mode reach the network (through wrap_network) and the
    record, as `ddpm sample`'s do; on a CPU, channels_last inverts as the default layout does."""
    import json

    from ddpm.cli import main

    run, data = class_run
    seen = wrap_calls
    flags = ["--num", "2", "--steps", "5", "--data-dir", str(data), "--device", "cpu"]
    assert main(["invert", str(run), *flags, "--out", str(tmp_path / "plain")]) == 0
    assert seen == [(torch.device("cpu"), "fp32", False, False, "default")]
    speed = ["--channels-last", "--compile", "--compile-mode", "max-autotune"]
    assert main(["invert", str(run), *flags, *speed, "--out", str(tmp_path / "fast")]) == 0
    assert seen[1:] == [(torch.device("cpu"), "fp32", True, True, "max-autotune")]
    plain, fast = (json.loads((tmp_path / n / "invert.json").read_text()) for n in ("plain", "fast"))
    assert fast.pop("channels_last") is True and fast.pop("compile") == "max-autotune"
    assert fast.keys() == plain.keys() and fast["precision"] == "fp32"
    for key in ("rmse_0_255", "latent_mean", "latent_std"):
        assert fast[key] == pytest.approx(plain[key], abs=2e-3), key
    latents = [np.load(tmp_path / n / "latents.npy") for n in ("plain", "fast")]
    np.testing.assert_allclose(latents[1], latents[0], atol=1e-4)
