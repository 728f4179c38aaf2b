"""ddpm.clip: the contrastive pair learns a dataset's captions, and saves and loads without pickle."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_idx

from ddpm.clip import ClipConfig, DomainClip, contrastive_loss, load_clip, save_clip, train_clip
from ddpm.config import DataConfig
from ddpm.errors import DataError

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


def test_the_loss_is_clips_when_captions_differ_and_counts_repeats_as_matches():
    torch.manual_seed(0)
    model = DomainClip(ClipConfig(**TINY))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    captions = ["a coat", "a bag", "a shoe"]
    image = F.normalize(model.encode_images(images), dim=-1)
    text = F.normalize(model.encode_text(captions).pooled, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(contrastive_loss(model, images, captions), clip)
    repeated = ["a coat", "a coat", "a shoe"]
    text = F.normalize(model.encode_text(repeated).pooled, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(contrastive_loss(model, images, repeated), expected)


def test_training_learns_the_classes_zero_shot_and_the_folder_round_trips(tmp_path):
    data = DataConfig(root=str(bars_dir(tmp_path / "bars")), image_size=8)
    model, info = train_clip(
        data, steps=120, batch_size=64, lr=3e-3, config=ClipConfig(**TINY), progress=False
    )
    # prompts for the four classes it saw: chance is 1 in 4
    assert info["zero_shot_test_accuracy"] >= 0.9, info
    save_clip(model, info, tmp_path / "enc")
    loaded, saved = load_clip(tmp_path / "enc")
    assert saved["zero_shot_test_accuracy"] == info["zero_shot_test_accuracy"]
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.similarity(images, ["a coat"]), model.similarity(images, ["a coat"]))
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["format"] == "ddpm-text-encoder" and config["tokenizer"] == "bytes"
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="text encoder .* is damaged"):
        load_clip(tmp_path / "enc")
    with pytest.raises(DataError, match="holds no text encoder"):
        load_clip(tmp_path)


def test_a_bpe_tower_learns_as_well_and_keeps_its_tokenizer_in_the_folder(tmp_path):
    data = DataConfig(root=str(bars_dir(tmp_path / "bars")), image_size=8)
    config = ClipConfig(**TINY, tokenizer="bpe")
    model, info = train_clip(data, steps=120, batch_size=64, lr=3e-3, config=config, progress=False)
    assert info["zero_shot_test_accuracy"] >= 0.9, info
    assert (
        model.tokenizer.vocab_size < 1000
        and model.text.token_embedding.num_embeddings == model.tokenizer.vocab_size
    )
    save_clip(model, info, tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["tokenizer"] == "bpe"
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


def test_the_cli_trains_into_a_folder_and_refuses_bad_input(tmp_path, capsys):
    from ddpm.cli import main

    bars = bars_dir(tmp_path / "bars", n_train=40, n_test=10)
    argv = ["train-text-encoder", "--data-dir", str(bars), "--image-size", "8", "--batch-size", "8"]
    assert main([*argv, "--steps", "3", "--out", str(tmp_path / "enc"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and "zero_shot_test_accuracy" in printed
    model, info = load_clip(tmp_path / "enc")
    assert info["dataset"] == "fashion-mnist" and info["model"]["max_length"] == 77
    assert info["tokenizer"] == "bytes" and not (tmp_path / "enc" / "tokenizer.json").exists()
    assert (
        main([*argv, "--steps", "3", "--tokenizer", "bpe", "--out", str(tmp_path / "bpe"), "--no-progress"])
        == 0
    )
    assert (
        load_clip(tmp_path / "bpe")[1]["tokenizer"] == "bpe"
        and (tmp_path / "bpe" / "tokenizer.json").is_file()
    )
    assert main([*argv, "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "steps and batch size must be positive" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("*.safetensors"))
    assert main([*argv, "--dataset", "moons", "--steps", "3", "--out", str(tmp_path / "m")]) == 2
    assert "has no class labels or captions" in capsys.readouterr().err
