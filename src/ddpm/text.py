"""Text to what the denoiser attends to: a byte-level tokenizer that takes any string, and a small
CLIP-style transformer text tower (causal attention; the end token's state is the pooled embedding).

An encoder's output for a batch of texts is a ``TextEncoding``: per-token states [B, L, D], a mask [B, L]
(True for real tokens) and a pooled embedding [B, D].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import first_line


@dataclass
class TextEncoding:
    """A ``Condition`` (ddpm.conditioning.condition), as ``TokenIds`` is."""

    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool, True where a token is real
    pooled: torch.Tensor  # [B, D]

    def to(self, device) -> TextEncoding:
        return TextEncoding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> TextEncoding:
        """The encodings of ``rows`` (a slice or an index tensor), as a TextEncoding."""
        return TextEncoding(self.tokens[rows], self.mask[rows], self.pooled[rows])

    def repeat_to(self, n: int) -> TextEncoding:
        """One encoding (a batch of 1) for ``n`` examples; a batch of ``n`` is returned as it is."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} text encodings for a batch of {n}")
        return TextEncoding(self.tokens.expand(n, -1, -1), self.mask.expand(n, -1), self.pooled.expand(n, -1))

    @staticmethod
    def cat(encodings: list[TextEncoding]) -> TextEncoding:
        """One batch of several; shorter ones padded (masked out) to the longest."""
        length = max(e.tokens.shape[1] for e in encodings)
        return TextEncoding(
            torch.cat([F.pad(e.tokens, (0, 0, 0, length - e.tokens.shape[1])) for e in encodings]),
            torch.cat([F.pad(e.mask, (0, length - e.mask.shape[1])) for e in encodings]),
            torch.cat([e.pooled for e in encodings]),
        )

    def truncate(self, length: int) -> TextEncoding:
        """The first ``length`` token positions (padding beyond the longest text is never attended)."""
        return TextEncoding(self.tokens[:, :length], self.mask[:, :length], self.pooled)

    def chunk(self, n: int) -> list[TextEncoding]:
        parts = zip(self.tokens.chunk(n), self.mask.chunk(n), self.pooled.chunk(n), strict=True)
        return [TextEncoding(*part) for part in parts]


@dataclass
class TokenIds:
    """Texts as token ids [B, L] (int64) with the mask of real tokens [B, L], for a denoiser that encodes
    them with its own text tower (``TextTowerDenoiser``). Batches like a TextEncoding."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> TokenIds:
        return TokenIds(self.ids.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> TokenIds:
        return TokenIds(self.ids[rows], self.mask[rows])

    def repeat_to(self, n: int) -> TokenIds:
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"{len(self)} texts for a batch of {n}")
        return TokenIds(self.ids.expand(n, -1), self.mask.expand(n, -1))

    def truncate(self, length: int) -> TokenIds:
        return TokenIds(self.ids[:, :length], self.mask[:, :length])

    def chunk(self, n: int) -> list[TokenIds]:
        return [TokenIds(i, m) for i, m in zip(self.ids.chunk(n), self.mask.chunk(n), strict=True)]

    @staticmethod
    def cat(items: list[TokenIds]) -> TokenIds:
        """One batch of several; shorter ones padded (masked out; the tower is causal, so the padding
        after a text never reaches it) to the longest."""
        length = max(i.ids.shape[1] for i in items)
        return TokenIds(
            torch.cat([F.pad(i.ids, (0, length - i.ids.shape[1])) for i in items]),
            torch.cat([F.pad(i.mask, (0, length - i.mask.shape[1])) for i in items]),
        )


TEXT_CONDITIONS = (TextEncoding, TokenIds)  # what a text-conditional network takes as its condition


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, a start (256) and an end (257) token and padding (258): every
    string has a tokenization, and nothing is downloaded or trained. Texts longer than ``max_length``
    tokens are cut, keeping the end token."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def __init__(self, max_length: int = 64):
        if max_length < 3:
            raise ValueError("max_length must be at least 3 (start, one byte, end)")
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_length] (int64) and the mask of real tokens [B, max_length] (bool)."""
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            body = list(str(text).encode("utf-8"))[: self.max_length - 2]
            row = [self.BOS, *body, self.EOS]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.PAD

    def length(self, text: str) -> int:
        """The tokens of ``text`` with the start and end tokens, before any is cut to max_length."""
        return len(str(text).encode("utf-8")) + 2

    def decode(self, ids: torch.Tensor) -> str:
        return bytes(i for i in ids.tolist() if i < 256).decode("utf-8", errors="replace")


class BpeTokenizer:
    """Byte-level BPE (as GPT-2 and CLIP use) trained with `tokenizers` on a dataset's captions: the 256
    byte symbols are in the vocabulary, so every string still has a tokenization, and frequent words
    become single tokens (shorter sequences than bytes). Same interface as ``ByteTokenizer``; saved as
    the `tokenizers` JSON."""

    PAD, BOS, EOS = 0, 1, 2
    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, tokenizer, max_length: int = 64):
        if max_length < 3:
            raise ValueError("max_length must be at least 3 (start, one token, end)")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.vocab_size = tokenizer.get_vocab_size()

    @staticmethod
    def _module():
        try:
            import tokenizers
        except ImportError:
            raise ImportError("the BPE tokenizer needs tokenizers: pip install tokenizers") from None
        return tokenizers

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 1000, max_length: int = 64) -> BpeTokenizer:
        tk = cls._module()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.SPECIALS),  # ids 0, 1, 2 in this order
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer, max_length)

    @classmethod
    def from_json(cls, text: str, max_length: int) -> BpeTokenizer:
        try:
            tokenizer = cls._module().Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exceptions for a damaged file
            raise ValueError(f"not a tokenizers JSON ({first_line(e)})") from None
        return cls(tokenizer, max_length)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_length] (int64) and the mask of real tokens [B, max_length] (bool)."""
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, encoding in enumerate(self.tokenizer.encode_batch([str(t) for t in texts])):
            row = [self.BOS, *encoding.ids[: self.max_length - 2], self.EOS]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids, mask

    def length(self, text: str) -> int:
        """The tokens of ``text`` with the start and end tokens, before any is cut to max_length."""
        return len(self.tokenizer.encode(str(text)).ids) + 2

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode([i for i in ids.tolist() if i > self.EOS])


class TextTransformer(nn.Module):
    """A small CLIP-like text tower: token + learned position embeddings, pre-norm transformer layers
    with causal attention (so padding after the end token never reaches a real token), a final norm.
    The pooled embedding is the end token's state, projected (as CLIP's text_projection)."""

    def __init__(
        self,
        vocab_size: int = ByteTokenizer.vocab_size,
        width: int = 128,
        layers: int = 3,
        heads: int = 4,
        max_length: int = 64,
        embed_dim: int = 128,
    ):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=width**-0.5)
        self.width, self.embed_dim, self.max_length = width, embed_dim, max_length

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding[:length]
        causal = torch.triu(torch.full((length, length), -math.inf, device=ids.device), 1)
        x = self.final_norm(self.transformer(x, mask=causal, is_causal=True))
        last = mask.long().sum(1) - 1  # the end token: the last real one
        pooled = self.projection(x[torch.arange(len(ids), device=ids.device), last])
        return TextEncoding(x, mask, pooled)


class TextTowerDenoiser(nn.Module):
    """A text-conditional denoiser and the text tower trained with it (as GLIDE trains its text
    transformer with the diffusion model): given token ids, the tower encodes them and the denoiser
    attends to the encoding."""

    def __init__(self, denoiser: nn.Module, tower: TextTransformer):
        super().__init__()
        self.denoiser, self.text = denoiser, tower

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: TokenIds | TextEncoding) -> torch.Tensor:
        if isinstance(y, TokenIds):
            y = self.text(y.ids, y.mask)
        return self.denoiser(x, t, y)


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
