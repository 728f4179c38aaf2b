"""The README's Python API example, on a tiny configuration."""

import torch
from conftest import tiny_config

import ddpm


def test_readme_api_flow(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, steps=3)
    ddpm.Trainer(cfg, tmp_path / "api-demo", progress=False).train()

    model, diffusion, cfg = ddpm.load_model(tmp_path / "api-demo")
    images = ddpm.generate(model, diffusion, num=3, shape=(1, 8, 8), steps=10, seed=0)
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    ddpm.save_grid(ddpm.to_uint8(images), tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_readme_pieces_flow():
    diffusion = ddpm.GaussianDiffusion(
        ddpm.make_betas("linear", 1000), mean_type="eps", var_type="fixedlarge"
    )
    unet = ddpm.UNet(in_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(16,), resolution=32)
    with torch.no_grad():
        steps = list(diffusion.respaced(3).p_sample_loop_progressive(unet, (1, 3, 32, 32)))
    assert [s.t for s in steps] == [2, 1, 0]
    assert all(s.pred_x0.abs().max() <= 1 for s in steps)
