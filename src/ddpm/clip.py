"""The domain CLIP model: a text tower and a convolutional image tower trained contrastively on a
dataset's image-caption pairs (`ddpm train-text-encoder`). Its text tower, frozen, is the default text
encoder of a text-conditional run; the pair scores how well samples agree with their prompts (the domain
CLIP score, labelled as such: like the domain FID it is not comparable with scores of OpenAI's CLIP).

Saved as a folder: ``model.safetensors`` (both towers), ``config.json`` (the architecture, the
tokenizer, how it was trained and its zero-shot accuracy) and, for a BPE tokenizer, its ``tokenizer.json``;
no pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .captions import article
from .config import DataConfig
from .data import BatchOrder, load_dataset
from .errors import DataError
from .files import atomic_write, write_json
from .images import to_model_range
from .text import BpeTokenizer, ByteTokenizer, TextEncoding, TextTransformer, normalized

FORMAT = "ddpm-text-encoder"
MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
TOKENIZERS = ("bytes", "bpe")
BPE_VOCAB_SIZE = 1000  # at most: BPE stops merging when the captions have no more pairs to join


@dataclass
class ClipConfig:
    width: int = 128  # text tower width
    layers: int = 3
    heads: int = 4
    max_length: int = 77  # bytes + start + end tokens
    embed_dim: int = 128  # the shared image-text space
    image_channels: int = 1
    image_width: int = 32
    tokenizer: str = "bytes"  # "bytes" (UTF-8 bytes) or "bpe" (byte-level BPE trained on the captions)


class ImageTower(nn.Module):
    """A small CNN from images in [-1, 1] to the shared embedding space."""

    def __init__(self, channels: int, width: int, embed_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, embed_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class DomainClip(nn.Module):
    """Text tower + image tower + CLIP's learned temperature (initialised at 1 / 0.07)."""

    def __init__(self, config: ClipConfig, tokenizer: ByteTokenizer | BpeTokenizer | None = None):
        super().__init__()
        if config.tokenizer not in TOKENIZERS:
            raise DataError(f"tokenizer {config.tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
        if config.tokenizer == "bpe" and tokenizer is None:
            raise DataError("a BPE text tower needs its trained tokenizer")
        self.config = config
        self.tokenizer = tokenizer or ByteTokenizer(config.max_length)
        self.text = TextTransformer(
            self.tokenizer.vocab_size,
            config.width,
            config.layers,
            config.heads,
            config.max_length,
            config.embed_dim,
        )
        self.image = ImageTower(config.image_channels, config.image_width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, texts: list[str]) -> TextEncoding:
        ids, mask = self.tokenizer(texts)
        length = int(mask.sum(1).max())  # causal: the padding beyond the longest text changes nothing
        device = self.logit_scale.device
        return self.text(ids[:, :length].to(device), mask[:, :length].to(device))

    def encode_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.image(to_model_range(images_uint8).to(self.logit_scale.device))

    def similarity(self, images_uint8: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with each text, [N_images, N_texts]."""
        return normalized(self.encode_images(images_uint8)) @ normalized(self.encode_text(texts).pooled).T


def contrastive_loss(model: DomainClip, images_uint8: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every pair that shares a caption counted as a match (the
    made captions repeat: a batch holds several "a photo of a coat")."""
    image = normalized(model.encode_images(images_uint8))
    distinct = list(dict.fromkeys(captions))  # each text encoded once
    ids = {c: i for i, c in enumerate(distinct)}
    caption_ids = torch.tensor([ids[c] for c in captions], device=image.device)
    text = normalized(model.encode_text(distinct).pooled)[caption_ids]
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
    same = (caption_ids[:, None] == caption_ids[None]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@torch.no_grad()
def zero_shot_accuracy(
    model: DomainClip, images_uint8, labels, class_names, classes=None, batch_size: int = 500
) -> float:
    """Share of images whose most similar prompt among "a photo of a {class}" (for ``classes``, by
    default all) is their own class."""
    model.eval()
    classes = list(range(len(class_names))) if classes is None else list(classes)
    prompts = [f"a photo of {article(class_names[c])} {class_names[c].lower()}" for c in classes]
    text = normalized(model.encode_text(prompts).pooled)
    keep = torch.isin(labels, torch.tensor(classes))
    images_uint8, labels = images_uint8[keep], labels[keep]
    hits = 0
    for start in range(0, len(images_uint8), batch_size):
        image = normalized(model.encode_images(images_uint8[start : start + batch_size]))
        best = torch.tensor(classes)[(image @ text.T).argmax(1).cpu()]
        hits += (best == labels[start : start + batch_size]).sum().item()
    return hits / max(len(images_uint8), 1)


def train_clip(
    data: DataConfig,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    config: ClipConfig | None = None,
    progress: bool = True,
) -> tuple[DomainClip, dict]:
    """Train the pair on ``data``'s captions (data.labels is set to "captions"), with ``config``'s
    tokenizer (a BPE one is first trained on the captions); report the zero-shot class accuracy on the
    test split when the data has class labels."""
    if steps <= 0 or batch_size <= 0:
        raise DataError("text encoder steps and batch size must be positive")
    train_cfg = DataConfig(**{**data.__dict__, "labels": "captions", "split": "train"})
    dataset = load_dataset(train_cfg)
    config = config or ClipConfig()
    config.image_channels = dataset.channels
    tokenizer = None
    if config.tokenizer == "bpe":
        tokenizer = BpeTokenizer.train(dataset.captions, BPE_VOCAB_SIZE, config.max_length)
    torch.manual_seed(seed)
    model = DomainClip(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = BatchOrder(len(dataset), batch_size, seed)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="text encoder", unit="step")
    start = time.time()
    model.train()
    for step in iterator:
        for group in optimizer.param_groups:  # linear warm-up over 100 steps, then cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = order.indices(step)
        loss = contrastive_loss(model, dataset.data[idx], [dataset.captions[i] for i in idx.tolist()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    info = {
        "format": FORMAT,
        "dataset": data.dataset,
        "image_size": data.image_size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": round(loss.item(), 4),
        "seconds": round(time.time() - start, 1),
    }
    if dataset.labels is not None:
        test = load_dataset(DataConfig(**{**train_cfg.__dict__, "split": "test"}))
        # among the classes it was trained on (a prompt never seen in training may land anywhere)
        seen = dataset.labels.unique().tolist()
        accuracy = zero_shot_accuracy(model, test.data, test.labels, dataset.class_names, seen)
        info["zero_shot_test_accuracy"] = round(accuracy, 4)
        info["class_names"] = list(dataset.class_names)
    return model, info


def save_clip(model: DomainClip, info: dict, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    if isinstance(model.tokenizer, BpeTokenizer):
        atomic_write(folder / TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(model.tokenizer.to_json()))
    write_json(
        folder / CONFIG_FILE, {**info, "model": asdict(model.config), "tokenizer": model.config.tokenizer}
    )


def load_clip(folder: str | Path) -> tuple[DomainClip, dict]:
    """A pair saved by `ddpm train-text-encoder`; one-line errors for a missing or damaged folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise DataError(
            f"{folder} holds no text encoder ({CONFIG_FILE}); train one with `ddpm train-text-encoder`"
        )
    try:
        info = json.loads((folder / CONFIG_FILE).read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {FORMAT!r}")
        config = ClipConfig(**info["model"])
        tokenizer = None
        if config.tokenizer == "bpe":
            tokenizer = BpeTokenizer.from_json((folder / TOKENIZER_FILE).read_text(), config.max_length)
        model = DomainClip(config, tokenizer)
        model.load_state_dict(load_file(str(folder / MODEL_FILE)))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"text encoder {folder} is damaged ({e})") from None
    return model.eval(), info
