"""The domain CLIP model: a text tower and a convolutional image tower trained contrastively on a
dataset's image-caption pairs (`ddpm train-text-encoder`). Its text tower, frozen, is the default text
encoder of a text-conditional run; the pair scores how well samples agree with their prompts (the domain
CLIP score, labelled as such: like the domain FID it is not comparable with scores of OpenAI's CLIP).

`ddpm train-text-encoder` trains the pair through the same Trainer as every model (lock, resume, atomic
checkpoints), then exports it into its run directory: ``model.safetensors`` (both towers),
``text-encoder.json`` (the architecture, the tokenizer, how it was trained and its zero-shot accuracy) and,
for a BPE tokenizer, its ``tokenizer.json``; no pickle. Those three files are the text encoder folder a
text-conditional run copies; folders written before (``config.json`` in place of ``text-encoder.json``)
still load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .captions import article
from .config import DataConfig
from .data import load_dataset
from .errors import DataError
from .files import atomic_write, read_json, read_text, write_json
from .images import to_model_range
from .text import BpeTokenizer, ByteTokenizer, TextEncoding, TextTransformer, normalized

FORMAT = "ddpm-text-encoder"
MODEL_FILE, INFO_FILE, TOKENIZER_FILE = "model.safetensors", "text-encoder.json", "tokenizer.json"
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

    def forward(self, images: torch.Tensor, captions: CaptionBatch) -> torch.Tensor:
        """The training pass on images in [-1, 1]: CLIP's symmetric cross-entropy per image [B], with every
        pair that shares a caption counted as a match (the made captions repeat: a batch holds several "a
        photo of a coat"). Image i's loss is the mean of its row's and its column's cross-entropy, so the
        batch mean is CLIP's loss."""
        image = normalized(self.image(images))
        text = normalized(self.text(captions.ids, captions.mask).pooled)[captions.index]
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (captions.index[:, None] == captions.index[None]).float()
        targets = same / same.sum(1, keepdim=True)
        rows = F.cross_entropy(logits, targets, reduction="none")
        columns = F.cross_entropy(logits.T, targets, reduction="none")
        return (rows + columns) / 2


@dataclass
class CaptionBatch:
    """The captions of a batch: each distinct one tokenized once ([D, L] ids and mask) and, per image, the
    row of its caption (``index``, [B])."""

    ids: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor


class TokenizedCaptions:
    """Every distinct caption of a dataset tokenized once; ``ids[i]`` is image i's caption row, and
    ``batch(rows)`` the CaptionBatch of a batch's caption rows."""

    def __init__(self, tokenizer, captions: list[str]):
        distinct = list(dict.fromkeys(captions))
        row = {c: i for i, c in enumerate(distinct)}
        self.ids = torch.tensor([row[c] for c in captions], dtype=torch.long)
        self.tokens, self.mask = tokenizer(distinct)

    def to(self, device) -> TokenizedCaptions:
        self.tokens, self.mask = self.tokens.to(device), self.mask.to(device)
        return self

    def batch(self, rows: torch.Tensor) -> CaptionBatch:
        distinct, index = rows.to(self.tokens.device).unique(return_inverse=True)
        mask = self.mask[distinct]
        length = int(mask.sum(1).max())  # causal: the padding beyond the longest caption changes nothing
        return CaptionBatch(self.tokens[distinct, :length], mask[:, :length], index)


def clip_config(cfg, channels: int) -> ClipConfig:
    """The pair's architecture from a run config's model section (model.kind = text-encoder)."""
    m = cfg.model
    return ClipConfig(
        m.text_width,
        m.text_layers,
        m.text_heads,
        m.text_max_length,
        m.embed_dim,
        channels,
        m.image_width,
        m.tokenizer,
    )


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


def run_tokenizer(cfg, captions: list[str], run_dir: Path) -> ByteTokenizer | BpeTokenizer:
    """A text-encoder run's tokenizer: bytes, or BPE trained on the captions once (the run keeps it in its
    tokenizer.json, so that a resumed run has the same vocabulary)."""
    m = cfg.model
    if m.tokenizer == "bytes":
        return ByteTokenizer(m.text_max_length)
    kept = Path(run_dir) / TOKENIZER_FILE
    if kept.is_file():
        try:
            return BpeTokenizer.from_json(read_text(kept, "the run's tokenizer"), m.text_max_length)
        except (OSError, ValueError) as e:
            raise DataError(f"the run's tokenizer {kept} is damaged ({e})") from None
    return BpeTokenizer.train(captions, BPE_VOCAB_SIZE, m.text_max_length)


def keep_tokenizer(tokenizer, run_dir: Path) -> None:
    if isinstance(tokenizer, BpeTokenizer) and not (Path(run_dir) / TOKENIZER_FILE).is_file():
        atomic_write(Path(run_dir) / TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(tokenizer.to_json()))


def export_text_encoder(run_dir: str | Path, device="cpu") -> dict:
    """Write a `train-text-encoder` run's (EMA) weights as a text encoder folder inside the run
    (model.safetensors, text-encoder.json and, for BPE, tokenizer.json), with the zero-shot class accuracy
    on the test split when the data has classes. Returns the folder's info."""
    from .checkpoint import CHECKPOINT_NAME, Checkpoint
    from .config import Config

    run_dir = Path(run_dir)
    ckpt = Checkpoint(run_dir / CHECKPOINT_NAME)
    cfg = Config.from_dict(ckpt.config)
    train = load_dataset(DataConfig(**{**cfg.data.__dict__, "split": "train"}))
    model = DomainClip(clip_config(cfg, cfg.data.channels), run_tokenizer(cfg, train.captions, run_dir))
    model.load_state_dict(ckpt.weights(use_ema=True))
    model.to(device).eval()
    t = cfg.train
    info = {
        "format": FORMAT,
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "steps": ckpt.step,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "seed": t.seed,
        "seconds": round(float(ckpt.train_state.get("train_seconds", 0.0)), 1),
    }
    if train.labels is not None:
        test = load_dataset(DataConfig(**{**cfg.data.__dict__, "split": "test"}))
        # among the classes it was trained on (a prompt never seen in training may land anywhere)
        seen = train.labels.unique().tolist()
        accuracy = zero_shot_accuracy(model, test.data, test.labels, train.class_names, seen)
        info["zero_shot_test_accuracy"] = round(accuracy, 4)
        info["class_names"] = list(train.class_names)
    save_clip(model.cpu(), info, run_dir)
    return info


def info_file(folder: str | Path) -> Path | None:
    """The file that makes ``folder`` a text encoder folder: text-encoder.json, or the config.json of a
    folder written before text encoders trained in run directories (format ddpm-text-encoder)."""
    folder = Path(folder)
    if (folder / INFO_FILE).is_file():
        return folder / INFO_FILE
    try:
        if read_json(folder / "config.json", expect=dict, strict=False).get("format") == FORMAT:
            return folder / "config.json"
    except DataError:
        pass
    return None


def is_text_encoder(folder: str | Path) -> bool:
    """A text encoder folder, or a `train-text-encoder` run (finished or not: loading says which)."""
    folder = Path(folder)
    if info_file(folder) is not None:
        return True
    try:
        return read_json(folder / "config.json", expect=dict, strict=False)["model"]["kind"] == "text-encoder"
    except (DataError, KeyError, TypeError):
        return False


def folder_files(folder: str | Path) -> list[Path]:
    """The files of a text encoder folder (what a run's copy of it holds)."""
    folder = Path(folder)
    return [info_file(folder), *(p for p in (folder / MODEL_FILE, folder / TOKENIZER_FILE) if p.is_file())]


def save_clip(model: DomainClip, info: dict, folder: str | Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    if isinstance(model.tokenizer, BpeTokenizer):
        atomic_write(folder / TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(model.tokenizer.to_json()))
    write_json(
        folder / INFO_FILE, {**info, "model": asdict(model.config), "tokenizer": model.config.tokenizer}
    )


def load_clip(folder: str | Path) -> tuple[DomainClip, dict]:
    """A pair saved by `ddpm train-text-encoder` (its run, or a copy of the folder it exports); one-line
    errors for a missing, unfinished or damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    info_path = info_file(folder)
    if info_path is None and is_text_encoder(folder):
        raise DataError(
            f"text encoder run {folder} has not finished; continue it with `ddpm train-text-encoder "
            f"--resume {folder}` (in Python: ddpm.Trainer with resume=True)"
        )
    if info_path is None:
        raise DataError(
            f"{folder} holds no text encoder ({INFO_FILE}); train one with `ddpm train-text-encoder`"
        )
    try:
        info = read_json(info_path, expect=dict, strict=False)
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {FORMAT!r}")
        config = ClipConfig(**info["model"])
        tokenizer = None
        if config.tokenizer == "bpe":
            tokenizer = BpeTokenizer.from_json(read_text(folder / TOKENIZER_FILE), config.max_length)
        model = DomainClip(config, tokenizer)
        model.load_state_dict(load_file(str(folder / MODEL_FILE)))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError, DataError) as e:
        raise DataError(f"text encoder {folder} is damaged ({e})") from None
    return model.eval(), info
