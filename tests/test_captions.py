"""ddpm.captions: captions read from image folders and made from class names and measured pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.captions import TEMPLATES, attribute_words, folder_captions, make_captions, measure
from ddpm.config import DataConfig, validate
from ddpm.data import load_dataset
from ddpm.errors import ConfigError, DataError
from ddpm.presets import preset


def squares(sides, values):
    """8x8 images, each a centred-ish square of ``side`` pixels at brightness ``value`` on black."""
    images = torch.zeros(len(sides), 1, 8, 8, dtype=torch.uint8)
    for i, (side, value) in enumerate(zip(sides, values, strict=True)):
        images[i, 0, :side, :side] = value
    return images


def test_measure_gives_the_foreground_mean_and_share():
    images = squares([2, 4], [100, 200])
    images[1, 0, 7, 7] = 10  # darker than the foreground threshold: background
    intensity, area = measure(images)
    assert intensity.tolist() == [100.0, 200.0]
    assert area.tolist() == [4 / 64, 16 / 64]


def test_attributes_are_the_lowest_and_highest_thirds_within_each_class():
    # class 0: areas grow, brightness falls; class 1: all alike but its brightest image
    images = squares([1, 2, 3, 4, 5, 6, 3, 3, 3], [250, 200, 150, 120, 90, 60, 100, 100, 200])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    words = attribute_words(images, labels)
    assert words[:6] == [["small", "light"], ["small", "light"], [], [], ["large", "dark"], ["large", "dark"]]
    assert words[8] == ["light"] and words[6] == words[7] == []  # no size word: all the same size


def test_captions_name_the_class_with_varied_templates_and_the_measured_words(idx_dir):
    data = load_dataset(DataConfig(root=str(idx_dir), image_size=8, split="train", labels="captions"))
    assert len(data.captions) == len(data) == 40 and data.labels is not None  # the classes are kept too
    words = attribute_words(data.data, data.labels)
    for caption, label, attrs in zip(data.captions, data.labels.tolist(), words, strict=True):
        name = data.class_names[label].lower()
        assert caption.endswith(name) or caption.endswith(f"{name}, grayscale")
        assert all(w in caption.split() for w in attrs)
    used = {t for t in TEMPLATES for c in data.captions if c.startswith(t.split("{")[0]) and t.split("{")[0]}
    assert len(used) >= 2  # varied
    assert len({c.split()[0] for c in data.captions}) >= 3
    assert not any(" a ankle" in f" {c}" for c in data.captions)  # "an ankle boot"
    again = make_captions(data.data, data.labels, data.class_names)
    assert again == data.captions  # seeded: the same captions every time
    assert make_captions(data.data, data.labels, data.class_names, seed=1) != data.captions


def test_attribute_dropout_leaves_out_the_words_of_a_seeded_share_and_keeps_the_templates(idx_dir):
    data = load_dataset(DataConfig(root=str(idx_dir), image_size=8, split="train", labels="captions"))
    images, labels, names = data.data, data.labels, data.class_names
    words = attribute_words(images, labels)
    none = make_captions(images, labels, names, attribute_dropout=1.0)
    assert not any(w in c.split() for c in none for w in ("small", "large", "dark", "light"))
    half = make_captions(images, labels, names, attribute_dropout=0.5)
    assert half == make_captions(images, labels, names, attribute_dropout=0.5)  # seeded
    kept = [h == c for h, c in zip(half, data.captions, strict=True)]
    # each caption is either the plain one or the one without words, in the same template
    assert all(k or h == n for k, h, n in zip(kept, half, none, strict=True))
    dropped = sum(not k for k, w in zip(kept, words, strict=True) if w)
    with_words = sum(bool(w) for w in words)
    assert 0 < dropped < with_words  # some, not all (40 images: a binomial draw, seeded)
    # the stream is the images' own: a larger share drops a superset
    more = make_captions(images, labels, names, attribute_dropout=0.9)
    assert all(m == n for h, m, n, c in zip(half, more, none, data.captions, strict=True) if h != c)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(labels="captions", caption_attribute_dropout=1.5), "must be in \\[0, 1\\], got 1.5"),
        (dict(labels="classes", caption_attribute_dropout=0.5), "applies to made captions"),
        (dict(dataset="folder", labels="captions", caption_attribute_dropout=0.5), "not to dataset=folder"),
    ],
)
def test_attribute_dropout_is_checked(changes, message):
    cfg = preset("fashion-mnist-text")
    for key, value in changes.items():
        setattr(cfg.data, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def write_folder(root, names):
    root.mkdir()
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(root / name)


def test_a_folder_reads_metadata_jsonl_or_txt_files(tmp_path):
    root = tmp_path / "jsonl"
    write_folder(root, ["a.png", "sub/b.png"])
    rows = [{"file_name": "sub/b.png", "text": "a bee"}, {"file_name": "a.png", "text": "an ant"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(DataConfig(dataset="folder", root=str(root), image_size=4, labels="captions"))
    assert data.captions == ["an ant", "a bee"] and data.labels is None  # in the images' (sorted) order

    txt = tmp_path / "txt"
    write_folder(txt, ["x.png", "y.png"])
    (txt / "x.png").with_suffix(".txt").write_text("ex\n")
    with pytest.raises(DataError, match="no caption for y.png: give .*metadata.jsonl or y.txt beside it"):
        folder_captions(txt, sorted(txt.glob("*.png")))
    (txt / "y.txt").write_text("why")
    assert folder_captions(txt, sorted(txt.glob("*.png"))) == ["ex", "why"]

    (root / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="metadata.jsonl has no caption for a.png"):
        folder_captions(root, sorted(root.rglob("*.png")))
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 1: expected \{\"file_name\""):
        folder_captions(root, sorted(root.rglob("*.png")))


def test_training_on_captions_needs_a_text_encoder_and_the_other_way_round(idx_dir, tmp_path):
    from conftest import tiny_config

    from ddpm.errors import ConfigError
    from ddpm.train import Trainer

    for labels, encoder in (("captions", ""), ("none", str(tmp_path))):
        cfg = tiny_config(idx_dir)
        cfg.data.labels, cfg.model.text_encoder = labels, encoder
        with pytest.raises(ConfigError, match="needs both data.labels=captions and model.text_encoder"):
            Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
