"""ddpm.text_metrics and `ddpm eval text`: prompt parsing, the attribute shift (checked on images whose
captions were made from their pixels), the CLIP score against a CLIP model's own forward pass (a tiny
random transformers CLIP saved by the test), and the command end to end on a tiny text-conditional run."""

import json
import shutil

import pytest
import torch
from test_encoders import word_tokenizer

from ddpm.captions import make_captions, measure
from ddpm.cli import main
from ddpm.clip import ClipConfig, DomainClip
from ddpm.data import CLASS_NAMES
from ddpm.sample import sample_to_dir
from ddpm.text_metrics import (
    PretrainedClip,
    attribute_prompts,
    attribute_shift,
    clip_score,
    domain_clip_score,
    prompt_class,
)

NAMES = CLASS_NAMES["fashion-mnist"]


def tiny_clip(folder):
    """A random transformers CLIPModel with a word tokenizer and an image processor, saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    size = word_tokenizer(folder, eos="<|endoftext|>", bos="<|startoftext|>")
    text = dict(
        vocab_size=size,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=3,
    )
    vision = dict(
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def test_prompts_name_their_class_as_whole_words():
    prompts = attribute_prompts(NAMES)
    assert len(prompts) == 5 * len(NAMES)
    assert prompts[:5] == [
        "a photo of a t-shirt/top",
        "a photo of a dark t-shirt/top",
        "a photo of a light t-shirt/top",
        "a photo of a small t-shirt/top",
        "a photo of a large t-shirt/top",
    ]
    assert "a photo of an ankle boot" in prompts and "a photo of a large ankle boot" in prompts
    assert [prompt_class(p, NAMES) for p in prompts] == [c for c in range(len(NAMES)) for _ in range(5)]
    assert prompt_class("a shirt", NAMES) == NAMES.index("Shirt")  # not T-shirt/top
    assert prompt_class("a coat and a bag", NAMES) is None and prompt_class("a hat", NAMES) is None


def garments(n_per_class=60, classes=3, seed=0):
    """Squares of random size and brightness on a black background, with class ids."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n_per_class * classes, 1, 16, 16, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    for i in range(len(images)):
        side = int(torch.randint(3, 15, (1,), generator=g))
        images[i, 0, :side, :side] = int(torch.randint(40, 255, (1,), generator=g))
    return images, labels


def test_the_attribute_shift_follows_captions_made_from_the_pixels_and_fails_when_they_lie():
    images, labels = garments()
    names = NAMES[:3]
    captions = make_captions(images, labels, names)
    shift = attribute_shift(images, captions, names)
    intensity, area = measure(images)
    for key, values in (("dark -> light", intensity), ("small -> large", area)):
        low, high = key.split(" -> ")
        assert shift[key]["classes_in_direction"] == shift[key]["classes"] == 3
        for c, name in enumerate(names):  # the mean over the high third minus over the low third
            has = [(f" {low} " in f" {t} ", f" {high} " in f" {t} ") for t in captions]
            lo = torch.tensor([h[0] and labels[i] == c for i, h in enumerate(has)])
            hi = torch.tensor([h[1] and labels[i] == c for i, h in enumerate(has)])
            expected = values[hi].double().mean() - values[lo].double().mean()
            assert shift[key]["per_class"][name]["difference"] == pytest.approx(expected.item(), abs=1e-4)
            assert shift[key]["per_class"][name]["samples"] == [int(lo.sum()), int(hi.sum())]
    swapped = [t.replace("dark", "@").replace("light", "dark").replace("@", "light") for t in captions]
    assert attribute_shift(images, swapped, names)["dark -> light"]["classes_in_direction"] == 0


def test_the_clip_score_is_torchmetrics_formula_and_agrees_with_clips_forward(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    assert clip_score(a, b) == pytest.approx(max(100 * cosine.mean().item(), 0))
    assert clip_score(a, -a) == 0.0  # the floor is on the mean
    folder = tiny_clip(tmp_path / "clip")
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    texts = ["a photo of a coat"] * 3 + ["a bag", "a small shoe"]
    # CLIP's own forward: logits_per_image = exp(logit_scale) * cosine
    model = CLIPModel.from_pretrained(folder)
    tokens = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(folder)(
        images=list(images.expand(-1, 3, -1, -1)), return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**tokens, pixel_values=pixels["pixel_values"])
        cosine = out.logits_per_image.diag() / model.logit_scale.exp()
    assert PretrainedClip(folder).score(images, texts) == pytest.approx(
        max(100 * cosine.mean().item(), 0), abs=1e-4
    )


def test_the_domain_clip_score_is_the_pairs_cosine_similarity():
    torch.manual_seed(0)
    clip = DomainClip(
        ClipConfig(width=32, layers=1, heads=2, max_length=40, embed_dim=32, image_width=8)
    ).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    texts = ["a coat", "a bag", "a coat", "dark"]
    with torch.no_grad():
        expected = 100 * clip.similarity(images, texts).diag().double().mean().item()
    assert domain_clip_score(clip, images, texts, batch_size=3) == pytest.approx(max(expected, 0), abs=1e-4)


def test_eval_text_scores_a_text_run_with_labelled_json(text_run, tmp_path, capsys):
    run, data, _ = text_run
    shutil.copytree(run, tmp_path / "run")
    clip = tiny_clip(tmp_path / "clip")
    argv = ["eval", "text", str(tmp_path / "run"), "--per-prompt", "3", "--steps", "3", "--batch-size", "6"]
    argv += ["--prompt", "a photo of a dark coat", "--prompt", "a photo of a light coat", "--prompt", "a bag"]
    argv += ["--clip-model", str(clip), "--data-dir", str(data), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "run" / "text-eval-9" / "text-eval.json").read_text())
    assert printed["out"] == str(tmp_path / "run" / "text-eval-9" / "text-eval.json")
    assert result["num_samples"] == 9 and result["prompts"] == 3
    assert result["class_agreement"]["samples_naming_a_class"] == 9
    assert set(result["class_agreement"]["per_class"]) == {"Coat", "Bag"}
    shade = result["attributes"]["dark -> light"]
    assert list(shade["per_class"]) == ["Coat"] and shade["per_class"]["Coat"]["samples"] == [3, 3]
    assert shade["real_test_images"]["classes"] >= 1
    assert result["domain_clip_score"]["model"].endswith("text-encoder")
    assert (
        0 <= result["domain_clip_score"]["score"] <= 100 and "real_test_images" in result["domain_clip_score"]
    )
    assert result["clip_score"]["model"] == str(clip) and 0 <= result["clip_score"]["score"] <= 100
    # scoring the samples' folder again gives the same numbers without sampling
    assert (
        main(
            [
                "eval",
                "text",
                str(tmp_path / "run" / "text-eval-9"),
                "--out",
                str(tmp_path / "again.json"),
                "--data-dir",
                str(data),
                "--cache-dir",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "again.json").read_text())
    assert (
        again["attributes"] == result["attributes"]
        and again["domain_clip_score"] == result["domain_clip_score"]
    )


def test_eval_text_refuses_bad_input_in_one_line(class_run, text_run, tmp_path, capsys):
    cases = [
        ([str(class_run[0])], "is not text-conditional"),
        ([str(tmp_path / "gone")], "does not exist"),
        ([str(text_run[0]), "--per-prompt", "0"], "--per-prompt: must be positive"),
        ([str(text_run[0]), "--clip-model", str(tmp_path)], "cannot load CLIP model"),
        ([str(tmp_path / "class-samples")], "no prompts in samples.json"),
    ]
    sample_to_dir(class_run[0], tmp_path / "class-samples", num=2, steps=2, progress=False)
    for argv, message in cases:
        capsys.readouterr()
        assert main(["eval", "text", *argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not list(text_run[0].glob("text-eval-*"))
