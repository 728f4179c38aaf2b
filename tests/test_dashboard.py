"""TensorBoard event files (ddpm.dashboard), read back with TensorBoard's own reader: the same numbers as
metrics.jsonl, the preview grids, one value per step after a kill and a resume, evaluations at the
checkpoint's step, and no effect on what training computes."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.dashboard import TENSORBOARD_DIR
from ddpm.evaluate import log_evaluation
from ddpm.train import Trainer

pytest.importorskip("tensorboard")


def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_events_hold_the_logged_numbers_and_the_preview_grids(idx_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=6, sample_every=3), run, progress=False).train()
    reader = events(run)
    rows = metrics(run)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(
        reader.Tags()["scalars"]
    )
    for name in ("loss", "lr", "grad_norm", "images_per_s"):
        logged = [(e.step, e.value) for e in reader.Scalars(f"train/{name}")]
        assert [step for step, _ in logged] == [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
        for (_, value), row in zip(logged, rows, strict=True):
            assert value == pytest.approx(row[name], rel=1e-6)
    grids = reader.Images("samples")
    assert [g.step for g in grids] == [3, 6]
    for grid in grids:  # the PNG the run wrote, pixel for pixel
        shown = Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")
        written = Image.open(run / "samples" / f"step_{grid.step:07d}.png").convert("RGB")
        assert np.array_equal(np.asarray(shown), np.asarray(written))


def test_a_run_killed_after_logging_and_resumed_shows_each_step_once(idx_dir, tmp_path, monkeypatch):
    """Killed while saving step 6, after logging steps 4 to 6 with its checkpoint at 3: the resumed run
    logs 4 to 6 again, and the events show each step once (not 1..6, 4..8), as metrics.jsonl does."""
    run = tmp_path / "run"
    save = Trainer.save

    def killed_at_step_6(trainer):
        if trainer.step == 6:
            raise KeyboardInterrupt  # the process dies here: no checkpoint of step 6
        save(trainer)

    monkeypatch.setattr(Trainer, "save", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(idx_dir, steps=8, checkpoint_every=3), run, progress=False).train()
    assert [e.step for e in events(run).Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(Trainer, "save", save)
    Trainer(tiny_config(idx_dir, steps=8, checkpoint_every=3), run, resume=True, progress=False).train()

    logged = [(e.step, e.value) for e in events(run).Scalars("train/loss")]
    rows = metrics(run)
    assert [step for step, _ in logged] == [row["step"] for row in rows] == list(range(1, 9))
    assert [value for _, value in logged] == pytest.approx([row["loss"] for row in rows], rel=1e-6)


def test_logging_changes_no_result_and_can_be_turned_off(idx_dir, tmp_path, capsys):
    Trainer(tiny_config(idx_dir, steps=4), tmp_path / "on", progress=False).train()
    argv = ["train", "--config", str(tmp_path / "on" / "config.json"), "--out", str(tmp_path / "off")]
    assert main([*argv, "--no-tensorboard", "--no-progress"]) == 0
    assert (tmp_path / "on" / TENSORBOARD_DIR).is_dir() and not (tmp_path / "off" / TENSORBOARD_DIR).exists()
    assert json.loads((tmp_path / "off" / "config.json").read_text())["train"]["tensorboard"] is False
    on, off = Checkpoint(tmp_path / "on"), Checkpoint(tmp_path / "off")
    for name, tensor in on.weights().items():
        assert torch.equal(off.weights()[name], tensor), name
    assert [r["loss"] for r in metrics(tmp_path / "on")] == [r["loss"] for r in metrics(tmp_path / "off")]


def test_an_evaluation_of_a_run_is_logged_at_the_sampled_step(idx_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=3), run, progress=False).train()
    made = {"checkpoint": str(run / "checkpoint.safetensors"), "step": 3, "sampler": "ddim", "steps": 10}
    made["weights"] = "ema"
    log_evaluation(
        run / "checkpoint.safetensors", made, {"fid": 42.5, "num_samples": 500, "extractor": "domain"}, "test"
    )
    log_evaluation(
        run / "checkpoint.safetensors",
        made | {"steps": 20},
        {"fid": 40.0, "num_samples": 500, "extractor": "domain"},
        "test",
    )
    reader = events(run)
    first = reader.Scalars("eval/fid-domain-test/ddim-10steps-n500-ema")
    assert [(e.step, e.value) for e in first] == [(3, 42.5)]
    assert [e.value for e in reader.Scalars("eval/fid-domain-test/ddim-20steps-n500-ema")] == [40.0]
    assert [e.step for e in reader.Scalars("train/loss")] == [1, 2, 3]  # the training events are kept
