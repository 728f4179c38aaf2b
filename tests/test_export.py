"""`ddpm export`: a run as a diffusers folder. Checked against diffusers itself: DDPMPipeline loads it, the
UNet2DModel computes our network's function, a seeded diffusers sample equals ours drawn with the same
noise, class-conditional runs sample with ``class_labels`` (docs/diffusers.md's lines, run as written), and
export then import gives back the same weights."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ddpm.build import load_model
from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.config import DiffusionConfig
from ddpm.convert import EXPORT_RECORD, diffusers_scheduler_config, export_diffusers, import_diffusers
from ddpm.errors import CheckpointError
from ddpm.train import Trainer

DIFFUSERS_DOC = Path(__file__).resolve().parents[1] / "docs" / "diffusers.md"


def trained_run(path, data_dir, **diffusion):
    """Six steps at a high learning rate: weights far enough from their initialisation (whose output
    layers start at 1e-10) that the network's output shows every layer."""
    cfg = tiny_config(data_dir, lr=2e-2)
    for key, value in diffusion.items():
        setattr(cfg.diffusion, key, value)
    Trainer(cfg, path, progress=False).train()
    return path


def our_sample(model, diffusion, shape, seed, labels=None):
    network = model if labels is None else (lambda x, t: model(x, t, labels))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return diffusion.p_sample_loop(network, shape, generator=generator)


def test_the_exported_pipeline_computes_our_network_and_draws_our_samples(idx_dir, tmp_path, capsys):
    from diffusers import DDPMPipeline

    run = trained_run(tmp_path / "run", idx_dir)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out), "--no-ema"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        EXPORT_RECORD,
        "model_index.json",
        "scheduler",
        "unet",
    ]
    pipe = DDPMPipeline.from_pretrained(out)
    model, diffusion, cfg = load_model(run, use_ema=False)

    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 49])
    with torch.no_grad():
        ours, theirs = model(x, t), pipe.unet(x, t).sample
    assert ours.std() > 1e-2  # a network whose output shows its weights
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    # Algorithm 2 both ways from one seed: diffusers draws x_T, then z at every t > 0, as we do
    images = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=50, output_type="np"
    )
    expected = (our_sample(model, diffusion, (2, 1, 8, 8), seed=5) + 1) / 2
    np.testing.assert_allclose(images.images, expected.clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=2e-4)
    assert images.images.std() > 0.05

    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["weights"] == "model" and record["step"] == 6 and record["null_class"] is None


def test_export_then_import_gives_back_identical_weights_and_schedule(idx_dir, tmp_path):
    """A schedule diffusers does not name (warmup10) travels as trained_betas and comes back by name."""
    run = trained_run(tmp_path / "run", idx_dir, beta_schedule="warmup10", var_type="fixedsmall")
    export_diffusers(run, tmp_path / "exported")
    scheduler = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
    assert len(scheduler["trained_betas"]) == 50
    import_diffusers(tmp_path / "exported", tmp_path / "back")
    before, after = Checkpoint(run), Checkpoint(tmp_path / "back")
    original, returned = before.weights(use_ema=True), after.weights(use_ema=True)
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert torch.equal(returned[name], tensor), name
    carried = ("num_timesteps", "beta_schedule", "beta_start", "beta_end", "var_type", "mean_type")
    assert {k: after.config["diffusion"][k] for k in carried} == {
        k: before.config["diffusion"][k] for k in carried
    }
    assert after.config["diffusion"]["beta_schedule"] == "warmup10"


def documented_class_labels_lines() -> str:
    """docs/diffusers.md's lines that sample an exported class-conditional run with diffusers."""
    blocks = re.findall(r"```python\n(.*?)```", DIFFUSERS_DOC.read_text(), re.S)
    lines = [block for block in blocks if "class_labels=" in block]
    assert len(lines) == 1, "docs/diffusers.md shows one way to sample an exported class-conditional run"
    return lines[0]


def test_a_class_conditional_export_samples_with_class_labels_as_the_docs_show(class_run, tmp_path):
    run, _ = class_run
    out = export_diffusers(run, tmp_path / "class-export")
    unet = json.loads((out / "unet" / "config.json").read_text())
    record = json.loads((out / EXPORT_RECORD).read_text())
    model, diffusion, cfg = load_model(run)
    assert unet["num_class_embeds"] == cfg.model.num_classes + 1 == record["null_class"] + 1

    # docs/diffusers.md's lines as written, with the folder and the classes it names
    namespace = {}
    code = documented_class_labels_lines().replace('"runs/fashion-mnist-class/diffusers"', repr(str(out)))
    exec(compile(code, "docs/diffusers.md", "exec"), namespace)
    labels, images = namespace["labels"], namespace["images"]
    assert images.shape == (len(labels), 1, 8, 8)
    expected = our_sample(model, diffusion, tuple(images.shape), seed=namespace["seed"], labels=labels)
    torch.testing.assert_close(images, expected, rtol=0, atol=2e-4)

    # the null class (guidance's "no class") is the last id, as the record says
    from diffusers import UNet2DModel

    theirs = UNet2DModel.from_pretrained(out / "unet").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    null = torch.full((2,), record["null_class"])
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(x, t, class_labels=null).sample, model(x, t, null), rtol=1e-4, atol=1e-5
        )

    back = import_diffusers(out, tmp_path / "back").parent
    returned = Checkpoint(back)
    assert returned.config["model"]["num_classes"] == cfg.model.num_classes
    assert returned.config["data"]["class_names"] == list(cfg.data.class_names)
    for name, tensor in Checkpoint(run).weights().items():
        assert torch.equal(returned.weights()[name], tensor), name


def test_what_diffusers_cannot_run_is_refused_in_one_line(text_run, tmp_path, capsys):
    run, _, _ = text_run
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "text-conditional run cannot be exported" in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(CheckpointError, match="learned_range variance cannot be exported"):
        diffusers_scheduler_config(DiffusionConfig(var_type="learned_range", loss_type="hybrid"))
    with pytest.raises(CheckpointError, match="predicting xprev"):
        diffusers_scheduler_config(DiffusionConfig(mean_type="xprev"))


def test_a_diffusers_class_model_without_a_null_class_is_not_imported(class_run, tmp_path):
    out = export_diffusers(class_run[0], tmp_path / "class-export")
    (out / EXPORT_RECORD).unlink()  # as diffusers itself would write it: no null class recorded
    with pytest.raises(CheckpointError, match="no null class for guidance"):
        import_diffusers(out, tmp_path / "back")


def test_export_never_replaces_a_folder_it_did_not_write(class_run, tmp_path, capsys):
    theirs = tmp_path / "someone-elses"
    (theirs / "unet").mkdir(parents=True)
    (theirs / "unet" / "notes.txt").write_text("keep me")
    assert main(["export", str(class_run[0]), "--out", str(theirs)]) == 2
    assert "not ddpm's output" in capsys.readouterr().err
    assert (theirs / "unet" / "notes.txt").read_text() == "keep me"
    # its own earlier export is replaced whole
    again = export_diffusers(class_run[0], tmp_path / "mine")
    export_diffusers(class_run[0], again, use_ema=False)
    assert json.loads((again / EXPORT_RECORD).read_text())["weights"] == "model"
