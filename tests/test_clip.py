"""ddpm.clip: the contrastive pair learns a dataset's captions, and saves and loads without pickle."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_idx

from ddpm.checkpoint import Checkpoint
from ddpm.clip import (
    ClipConfig,
    DomainClip,
    TokenizedCaptions,
    clip_config,
    export_text_encoder,
    is_text_encoder,
    load_clip,
    save_clip,
)
from ddpm.config import Config
from ddpm.data import BatchOrder
from ddpm.errors import ConfigError, DataError
from ddpm.images import to_model_range
from ddpm.presets import resolve_config
from ddpm.rng import step_generator
from ddpm.train import Trainer, learning_rate

TINY = dict(width=32, layers=1, heads=2, max_length=40, embed_dim=32, image_width=8)


def bars_dir(path, n_train=200, n_test=100):
    """8x8 images whose class (0..3) is the row of a bright bar, with noise: learnable from pixels."""
    rng = np.random.default_rng(1)
    path.mkdir()
    for name, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, size=n)
        images = rng.integers(0, 40, size=(n, 8, 8))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 2, 1:7] = rng.integers(150, 255)
        write_idx(path / f"{name}-images-idx3-ubyte.gz", images)
        write_idx(path / f"{name}-labels-idx1-ubyte.gz", labels)
    return path


def objective_loss(model: DomainClip, images_uint8: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The batch mean of the loss the text encoder's task takes for images and their captions: the pair's
    training pass on the images and the batch's distinct captions."""
    tokenized = TokenizedCaptions(model.tokenizer, captions)
    return model(to_model_range(images_uint8), tokenized.batch(tokenized.ids)).mean()


def clip_loss(model: DomainClip, images_uint8: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy written out, pairs that share a caption counted as matches."""
    image = F.normalize(model.encode_images(images_uint8), dim=-1)
    text = F.normalize(model.encode_text(captions).pooled, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def test_the_loss_is_clips_when_captions_differ_and_counts_repeats_as_matches():
    torch.manual_seed(0)
    model = DomainClip(ClipConfig(**TINY))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    captions = ["a coat", "a bag", "a shoe"]
    image = F.normalize(model.encode_images(images), dim=-1)
    text = F.normalize(model.encode_text(captions).pooled, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(objective_loss(model, images, captions), clip)
    repeated = ["a coat", "a coat", "a shoe"]
    text = F.normalize(model.encode_text(repeated).pooled, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(objective_loss(model, images, repeated), expected)
    torch.testing.assert_close(clip_loss(model, images, repeated), expected)


TINY_RUN = [
    "model.text_width=32",
    "model.text_layers=1",
    "model.text_heads=2",
    "model.text_max_length=40",
    "model.embed_dim=32",
    "model.image_width=8",
]


def train_encoder(run, bars, steps=120, tokenizer="bytes", resume=False, **train):
    """The fashion-mnist-text-encoder preset, tiny, on the bars, through the Trainer; then exported."""
    values = {"data.root": str(bars), "data.image_size": 8, "train.batch_size": 64, "train.lr": 3e-3}
    values.update({"train.steps": steps, "model.tokenizer": tokenizer, "train.log_every": 10})
    values.update({f"train.{k}": v for k, v in train.items()})
    base = Config.from_dict(Checkpoint(run / "checkpoint.safetensors").config) if resume else None
    cfg = resolve_config(base, None if resume else "fashion-mnist-text-encoder", None, values, TINY_RUN)
    trainer = Trainer(cfg, run, resume=resume, progress=False)
    result = trainer.train()
    return trainer, result, export_text_encoder(run)


def test_training_learns_the_classes_zero_shot_and_the_folder_round_trips(tmp_path):
    bars = bars_dir(tmp_path / "bars")
    trainer, _, info = train_encoder(tmp_path / "enc", bars)
    # prompts for the four classes it saw: chance is 1 in 4
    assert info["zero_shot_test_accuracy"] >= 0.9, info
    loaded, saved = load_clip(tmp_path / "enc")
    assert saved["zero_shot_test_accuracy"] == info["zero_shot_test_accuracy"] and saved["steps"] == 120
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        model = trainer.model.eval()
        assert torch.equal(loaded.similarity(images, ["a coat"]), model.similarity(images, ["a coat"]))
    exported = json.loads((tmp_path / "enc" / "text-encoder.json").read_text())
    assert exported["format"] == "ddpm-text-encoder" and exported["tokenizer"] == "bytes"
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["model"]["kind"] == "text-encoder"
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="text encoder .* is damaged"):
        load_clip(tmp_path / "enc")
    with pytest.raises(DataError, match="holds no text encoder"):
        load_clip(tmp_path)


def test_the_pairs_loss_and_schedule_are_the_ones_it_trained_with_before_the_trainer(tmp_path):
    """The Trainer's step is the old hand-written loop's: AdamW (decay 0.01), warm-up then cosine decay,
    CLIP's loss (``clip_loss``) on the batch's uint8 images and captions."""
    bars = bars_dir(tmp_path / "bars")
    trainer, _, _ = train_encoder(tmp_path / "enc", bars, steps=1)
    cfg = trainer.cfg
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    lrs = [learning_rate(s, 1.0, 100, "cosine", 600) for s in (0, 50, 100, 300, 600)]
    assert lrs == pytest.approx(
        [0.0, 0.5 * 0.5 * (1 + math.cos(math.pi / 12)), 0.5 * (1 + math.cos(math.pi / 6)), 0.5, 0.0]
    )
    torch.manual_seed(cfg.train.seed)
    model = DomainClip(clip_config(cfg, 1))
    dataset = trainer.task.examples.dataset
    idx = BatchOrder(len(dataset), 64, cfg.train.seed).indices(0)
    batch = trainer.task.batch(0, step_generator(cfg.train.seed, 0))
    trainer.model.load_state_dict(model.state_dict())
    captions = [dataset.captions[i] for i in idx.tolist()]
    expected = clip_loss(model, dataset.data[idx], captions)
    got = trainer.task.loss(trainer.network, batch).mean()
    torch.testing.assert_close(got, expected)


def test_a_resumed_encoder_run_ends_bit_identical_and_keeps_its_bpe_vocabulary(tmp_path):
    bars = bars_dir(tmp_path / "bars")
    straight, _, _ = train_encoder(tmp_path / "straight", bars, steps=6, tokenizer="bpe")
    cfg = Checkpoint(tmp_path / "straight" / "checkpoint.safetensors").config
    stopped = Trainer(Config.from_dict(cfg), tmp_path / "split", progress=False)
    for _ in range(3):
        stopped.train_step()
    stopped.save()
    stopped.run.unlock()  # as a killed process would leave it
    vocabulary = (tmp_path / "split" / "tokenizer.json").read_text()
    resumed, result, _ = train_encoder(tmp_path / "split", bars, steps=6, tokenizer="bpe", resume=True)
    assert result["step"] == 6 and (tmp_path / "split" / "tokenizer.json").read_text() == vocabulary
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    with pytest.raises(ConfigError, match="with train.lr_schedule=cosine it sets the learning rate"):
        train_encoder(tmp_path / "split", bars, steps=9, tokenizer="bpe", resume=True)


def test_a_bpe_tower_learns_as_well_and_keeps_its_tokenizer_in_the_folder(tmp_path):
    bars = bars_dir(tmp_path / "bars")
    trainer, _, info = train_encoder(tmp_path / "enc", bars, tokenizer="bpe")
    model = trainer.model.eval()
    assert info["zero_shot_test_accuracy"] >= 0.9, info
    assert (
        model.tokenizer.vocab_size < 1000
        and model.text.token_embedding.num_embeddings == model.tokenizer.vocab_size
    )
    assert json.loads((tmp_path / "enc" / "text-encoder.json").read_text())["tokenizer"] == "bpe"
    loaded, _ = load_clip(tmp_path / "enc")
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(
            loaded.similarity(images, ["a bar", "zebra"]), model.similarity(images, ["a bar", "zebra"])
        )
    (tmp_path / "enc" / "tokenizer.json").write_text("{junk")
    with pytest.raises(DataError, match="text encoder .* is damaged"):
        load_clip(tmp_path / "enc")
    (tmp_path / "enc" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="text encoder .* is damaged"):
        load_clip(tmp_path / "enc")


def test_a_folder_saved_before_the_trainer_still_loads(tmp_path):
    """Folders of the first format kept their info in config.json."""
    torch.manual_seed(0)
    model = DomainClip(ClipConfig(**TINY))
    save_clip(model, {"format": "ddpm-text-encoder"}, tmp_path / "old")
    (tmp_path / "old" / "text-encoder.json").rename(tmp_path / "old" / "config.json")
    loaded, info = load_clip(tmp_path / "old")
    assert info["model"]["width"] == 32 and is_text_encoder(tmp_path / "old")
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_the_cli_trains_into_a_run_and_refuses_bad_input(tmp_path, capsys):
    from ddpm.cli import main

    bars = bars_dir(tmp_path / "bars", n_train=40, n_test=10)
    argv = ["train-text-encoder", "--data-dir", str(bars), "--image-size", "8", "--batch-size", "8"]
    argv += [x for s in TINY_RUN for x in ("--set", s)]
    assert main([*argv, "--steps", "3", "--out", str(tmp_path / "enc"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 3 and "zero_shot_test_accuracy" in printed
    model, info = load_clip(tmp_path / "enc")
    assert info["dataset"] == "fashion-mnist" and info["model"]["max_length"] == 40
    assert info["tokenizer"] == "bytes" and not (tmp_path / "enc" / "tokenizer.json").exists()
    bpe = [*argv, "--steps", "3", "--tokenizer", "bpe", "--out", str(tmp_path / "bpe"), "--no-progress"]
    assert main(bpe) == 0
    assert (
        load_clip(tmp_path / "bpe")[1]["tokenizer"] == "bpe"
        and (tmp_path / "bpe" / "tokenizer.json").is_file()
    )
    capsys.readouterr()
    assert main([*argv, "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "train.steps must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*argv, "--dataset", "moons", "--steps", "3", "--out", str(tmp_path / "m")]) == 2
    assert "has no class labels or captions" in capsys.readouterr().err
    assert main([*argv, "--set", "model.kind=unet", "--out", str(tmp_path / "u")]) == 2
    assert "trains model.kind=text-encoder" in capsys.readouterr().err
    # a run killed before its end is not a text encoder yet, and no diffusion model at all
    cfg = resolve_config(None, "fashion-mnist-text-encoder", None, {"data.root": str(bars)}, TINY_RUN)
    cfg.data.image_size, cfg.train.batch_size = 8, 8
    trainer = Trainer(cfg, tmp_path / "cut", progress=False)
    trainer.train_step()
    trainer.save()
    with pytest.raises(DataError, match="has not finished; continue it with `ddpm train-text-encoder"):
        load_clip(tmp_path / "cut")
    assert main(["sample", str(tmp_path / "enc"), "--out", str(tmp_path / "s")]) == 2
    assert "is a text encoder run, not a diffusion model" in capsys.readouterr().err
