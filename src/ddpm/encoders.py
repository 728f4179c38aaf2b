"""Frozen text encoders behind one interface, and the cache of a run's caption encodings.

An encoder has ``width`` (the size of its token states) and ``encode(texts) -> TextEncoding``. Two kinds:

- the domain CLIP pair's text tower (a folder written by `ddpm train-text-encoder`);
- a pretrained model loaded with `transformers` from a local folder or a hub name: a CLIP text model
  (pooled = its projected end-token embedding when it has a projection, else its pooler output) or a
  T5 encoder (pooled = the mean of the real tokens' states). Nothing is downloaded unless the name is
  not a local folder and the hub is reachable.

The null condition is the encoding of the empty text "", as in GLIDE and Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import DataError, first_line
from .safeload import TRANSFORMERS_PICKLES, TRANSFORMERS_SAFETENSORS, refuse_pickled_folder
from .text import TextEncoding, TextTransformer, TokenIds


class DomainTextEncoder:
    """The text tower of a domain CLIP pair."""

    def __init__(self, folder: str | Path):
        from .clip import load_clip

        self.clip, self.info = load_clip(folder)
        self.width = self.clip.config.width
        self.pooled_width = self.clip.config.embed_dim  # the end token's state, projected
        self.source = {"kind": "domain-clip", "path": str(folder)}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEncoding:
        return self.clip.encode_text(list(texts))


class TrainedTowerEncoder(DomainTextEncoder):
    """A domain encoder whose text tower trains with the denoiser (model.text_tower finetune / scratch):
    the tower is then part of the model, so encoding a text here is tokenizing it."""

    def __init__(self, folder: str | Path, mode: str):
        super().__init__(folder)
        self.source = {**self.source, "text_tower": mode}

    def encode(self, texts: list[str]) -> TokenIds:
        ids, mask = self.clip.tokenizer(list(texts))
        return TokenIds(ids, mask).truncate(int(mask.sum(1).max()))

    def tower(self, fresh: bool) -> TextTransformer:
        """The text tower to train: a copy of the trained one, or (``fresh``) the same architecture with
        new random weights (from torch's global generator)."""
        import copy

        trained = self.clip.text
        if not fresh:
            return copy.deepcopy(trained)
        c = self.clip.config
        return TextTransformer(
            trained.token_embedding.num_embeddings, c.width, c.layers, c.heads, c.max_length, c.embed_dim
        )


class PretrainedTextEncoder:
    """A transformers CLIP text model or T5 encoder with its tokenizer, frozen."""

    def __init__(self, name: str, max_length: int = 77):
        try:
            import transformers
        except ImportError:
            raise DataError("pretrained text encoders need transformers: pip install transformers") from None
        from safetensors import SafetensorError

        refuse_pickled_folder(name, TRANSFORMERS_SAFETENSORS, TRANSFORMERS_PICKLES, f"text encoder {name}")
        try:
            # no code from the folder or the hub (trust_remote_code), weights from safetensors only
            config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            if config.model_type in ("clip", "clip_text_model"):
                with_projection = getattr(config, "projection_dim", None) is not None
                cls = (
                    transformers.CLIPTextModelWithProjection
                    if with_projection
                    else transformers.CLIPTextModel
                )
                self.kind = "clip"
            elif config.model_type in ("t5", "mt5", "umt5"):
                cls, self.kind = transformers.T5EncoderModel, "t5"
            else:
                raise DataError(f"{name}: a {config.model_type!r} model; text encoders are CLIP or T5")
            self.model = cls.from_pretrained(name, use_safetensors=True).eval()
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged model.safetensors
            first = first_line(e)
            raise DataError(f"cannot load text encoder {name!r}: {first}") from None
        text_config = getattr(config, "text_config", config)
        self.width = getattr(text_config, "hidden_size", None) or text_config.d_model
        # CLIP's pooled text is its projection's output where it has one; T5's is the tokens' mean
        projected = cls is transformers.CLIPTextModelWithProjection
        self.pooled_width = config.projection_dim if projected else self.width
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length))
        self.source = {"kind": f"transformers-{self.kind}", "path": name}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEncoding:
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state, batch["attention_mask"].bool()
        if self.kind == "clip":
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        else:
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextEncoding(tokens.float(), mask, pooled.float())


RUN_COPY = "text-encoder"  # a run keeps its domain encoder here, so that the run alone can sample


def run_text_encoder(cfg, run_dir: str | Path):
    """The text encoder of a text-conditional run: its own copy, else the one its config names; for a
    run that trains its text tower, a ``TrainedTowerEncoder`` (it tokenizes; the model encodes)."""
    from .clip import info_file

    copy = Path(run_dir) / RUN_COPY
    encoder = (
        DomainTextEncoder(copy) if info_file(copy) is not None else load_text_encoder(cfg.model.text_encoder)
    )
    mode = getattr(cfg.model, "text_tower", "frozen")
    if mode != "frozen":
        if not isinstance(encoder, DomainTextEncoder):
            raise DataError(
                f"model.text_tower={mode} trains the text tower of a `ddpm train-text-encoder` folder; "
                f"{encoder.source['path']} is a pretrained model (use it frozen)"
            )
        encoder = TrainedTowerEncoder(encoder.source["path"], mode)
    trained = (cfg.model.context_dim, cfg.model.pooled_dim or cfg.model.context_dim)
    if cfg.model.context_dim and (encoder.width, encoder.pooled_width) != trained:
        raise DataError(
            f"text encoder {encoder.source['path']} gives {encoder.width}-wide states and a "
            f"{encoder.pooled_width}-wide pooled text; the run was trained on {trained[0]} and {trained[1]}"
        )
    return encoder


def load_text_encoder(spec: str | Path):
    """The encoder named by ``spec``: a folder from `ddpm train-text-encoder`, or a transformers CLIP / T5
    model (a local folder or a hub name)."""
    from .clip import is_text_encoder

    path = Path(spec)
    if is_text_encoder(path):
        return DomainTextEncoder(path)
    if path.exists() and not (path / "config.json").is_file():
        raise DataError(f"{path} holds no text encoder (no config.json)")
    missing = (
        f"text encoder {spec} does not exist: train it first with `ddpm train-text-encoder --out {spec}` "
        "(in Python: ddpm.Trainer on a text encoder config such as "
        "ddpm.preset('fashion-mnist-text-encoder'), into that folder)"
    )
    if not path.exists() and _names_a_folder(str(spec)):
        raise DataError(f"{missing}, or name another text encoder folder or a transformers CLIP / T5 model")
    try:
        return PretrainedTextEncoder(str(spec))
    except DataError as e:
        if path.exists():
            raise
        raise DataError(f"{e}; if it is meant to be a folder, {missing}") from None


def _names_a_folder(spec: str) -> bool:
    """Whether a text encoder name that is no folder here can only be meant as one (not a hub model
    "name" or "owner/name"): a path with more parts, or one under runs/, where `ddpm train` puts runs."""
    parts = spec.replace("\\", "/").split("/")
    return spec.startswith(("/", ".", "~")) or len(parts) > 2 or parts[0] == "runs"


def context_length(encoder) -> int | None:
    """The most tokens of a text (with its start and end tokens) that ``encoder`` sees; a longer text is
    cut to them. None for an encoder that does not say."""
    if isinstance(encoder, PretrainedTextEncoder):
        return encoder.max_length
    tokenizer = getattr(getattr(encoder, "clip", None), "tokenizer", None)
    return getattr(tokenizer, "max_length", None)


def token_count(encoder, text: str) -> int:
    """The tokens of ``text`` (with the start and end tokens) for ``encoder``, before any cut."""
    if isinstance(encoder, PretrainedTextEncoder):
        return len(encoder.tokenizer(str(text), truncation=False, verbose=False)["input_ids"])
    return encoder.clip.tokenizer.length(text)


class CaptionCache:
    """Every distinct caption of a run encoded once (the encoder is frozen; a trained tower's captions are
    tokenized once), plus the null text (the conditioner's, "") as the last row. ``ids[i]`` is caption
    i's row; ``rows(ids)`` gives the encodings of rows."""

    def __init__(self, encoder, captions: list[str], null_text: str = "", batch_size: int = 256):
        distinct = list(dict.fromkeys(captions))
        texts = [*distinct, null_text]
        row = {c: i for i, c in enumerate(distinct)}
        self.ids = torch.tensor([row[c] for c in captions], dtype=torch.long)
        self.null = len(distinct)
        parts = [encoder.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        encoding = type(parts[0]).cat(parts)
        self.encoding = encoding.truncate(int(encoding.mask.sum(1).max()))  # the padding is never attended
        self.texts = texts

    def rows(self, ids: torch.Tensor) -> TextEncoding | TokenIds:
        return self.encoding[ids.to(self.encoding.mask.device)]

    def to(self, device) -> CaptionCache:
        self.encoding = self.encoding.to(device)
        return self
