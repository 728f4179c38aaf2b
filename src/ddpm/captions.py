"""Captions: read for image folders (a Hugging Face ``metadata.jsonl`` or a ``.txt`` beside each image),
and made for the labelled datasets from the class name, varied templates and attributes measured from the
pixels, so that a prompt says more than the class and a text-conditional model must read it.

Attributes are relative to the image's own class in the same split: "dark" / "light" for the lowest /
highest third of the mean foreground intensity, "small" / "large" for the lowest / highest third of the
foreground area (the share of pixels above ``FOREGROUND``); the middle third gets no word.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DataError
from .files import parse_json, read_text
from .rng import SEED_CAPTIONS, generator

MAX_METADATA_BYTES = 2**30  # a metadata.jsonl larger than this is refused, not read into memory
MAX_CAPTION_BYTES = 2**20  # and a caption .txt larger than this (tokenizers keep the first ~77 tokens)

FOREGROUND = 24  # 0..255: a pixel brighter than this belongs to the object (the backgrounds are ~0)
TEMPLATES = (
    "{a} {attrs}{name}",
    "a photo of {a} {attrs}{name}",
    "a picture of {a} {attrs}{name}",
    "{a} {attrs}{name}, grayscale",
    "a low resolution photo of {a} {attrs}{name}",  # not "a small photo": "small" is an attribute
    "{attrs}{name}",
)


def article(phrase: str) -> str:
    """ "an" before a vowel ("an ankle boot"), else "a"."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def measure(images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the mean intensity of the foreground (0..255, averaged over channels) and the
    foreground's share of the image (0..1)."""
    gray = images_uint8.float().mean(1)  # [N, H, W]
    mask = gray > FOREGROUND
    area = mask.flatten(1).float().mean(1)
    intensity = (gray * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    return intensity, area


def _thirds(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-1 / 0 / +1 for the lowest / middle / highest third of ``values`` within each class."""
    out = torch.zeros(len(values), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        low, high = torch.quantile(values[idx].double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
        out[idx] = (values[idx] > high).long() - (values[idx] < low).long()
    return out


def attribute_words(images_uint8: torch.Tensor, labels: torch.Tensor) -> list[list[str]]:
    """The attribute words of each image ([] for a middle-third image on both measures)."""
    intensity, area = measure(images_uint8)
    shade, size = _thirds(intensity, labels), _thirds(area, labels)
    words = []
    for s, z in zip(shade.tolist(), size.tolist(), strict=True):
        words.append([w for w in ({1: "large", -1: "small"}.get(z), {1: "light", -1: "dark"}.get(s)) if w])
    return words


def make_captions(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    class_names: tuple[str, ...],
    seed: int = 0,
    attribute_dropout: float = 0.0,
) -> list[str]:
    """One caption per image: a template chosen from (seed, image index), the class name in lower case
    and the image's attribute words, e.g. "a photo of a large dark ankle boot", "an ankle boot". A share
    ``attribute_dropout`` of the images (drawn from a stream of their own: the templates do not change)
    lose their words, so that a caption without words describes the whole class, not its middle thirds."""
    words = attribute_words(images_uint8, labels)
    choices = torch.randint(len(TEMPLATES), (len(labels),), generator=generator(seed, SEED_CAPTIONS, 0))
    choices = choices.tolist()
    if attribute_dropout:
        dropped = torch.rand(len(labels), generator=generator(seed, SEED_CAPTIONS, 1)) < attribute_dropout
        words = [[] if drop else attrs for attrs, drop in zip(words, dropped.tolist(), strict=True)]
    captions = []
    for label, attrs, choice in zip(labels.tolist(), words, choices, strict=True):
        prefix, name = "".join(w + " " for w in attrs), class_names[label].lower()
        captions.append(TEMPLATES[choice].format(a=article(prefix + name), attrs=prefix, name=name))
    return captions


def folder_captions(root: str | Path, files: list[Path]) -> list[str]:
    """The caption of each image file below ``root``: from ``root/metadata.jsonl`` when there is one
    (lines of {"file_name": path relative to root, "text": caption}, as Hugging Face image folders
    use), else from a ``.txt`` beside each image (same name). Every image must have one."""
    root = Path(root)
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        texts = {}
        lines = read_text(metadata, max_bytes=MAX_METADATA_BYTES).split("\n")  # not at U+2028: JSON's
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = parse_json(line, f"{metadata} line {number}")
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or "text" not in row:
                raise DataError(f'{metadata} line {number}: expected {{"file_name": ..., "text": ...}}')
            if not isinstance(row["text"], str):  # never the caption "None" or "[1, 2]"
                given = json.dumps(row["text"])
                given = given if len(given) <= 40 else given[:37] + "..."
                raise DataError(f'{metadata} line {number}: "text" must be a string, not {given}')
            texts[str(Path(row["file_name"]))] = row["text"]
        missing = [f for f in files if str(f.relative_to(root)) not in texts]
        if missing:
            raise DataError(f"{metadata} has no caption for {missing[0].relative_to(root)}")
        return [texts[str(f.relative_to(root))] for f in files]
    captions = []
    for f in files:
        txt = f.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(
                f"no caption for {f.relative_to(root)}: give {root}/metadata.jsonl or {txt.name} beside it"
            )
        captions.append(read_text(txt, "caption", max_bytes=MAX_CAPTION_BYTES).strip())
    return captions
