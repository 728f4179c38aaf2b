"""A user's request, checked: class names and ids, prompts that are text (and cut to the encoder's
context), the prompts of preview grids, balanced class blocks.

Class ids are 0..K-1 in the order of ``cfg.data.class_names``; id K is the null class (the unconditional
branch that condition dropout trains).
"""

from __future__ import annotations

import os
import sys

import torch

from ..captions import article
from ..errors import ConfigError


def class_index(cfg, name: str | int) -> int:
    """The id of a class given by name (exactly, else ignoring case where that names one class) or by
    index, for a class-conditional run's config."""
    names = list(cfg.data.class_names)
    if str(name) in names:
        return names.index(str(name))
    folded = [i for i, n in enumerate(names) if n.casefold() == str(name).casefold()]
    if len(folded) == 1:
        return folded[0]
    if len(folded) > 1:
        matches = ", ".join(names[i] for i in folded)
        raise ConfigError(f"class {name!r} is ambiguous ignoring case ({matches}): give its exact name")
    if str(name).isdecimal() and int(name) < cfg.model.num_classes:
        return int(name)
    raise ConfigError(f"unknown class {name!r}; this run's classes: {', '.join(names)}")


def check_text(text: str, what: str = "prompts") -> None:
    """``text`` must be text: Python hands a command-line argument that is not valid UTF-8 over with its
    bad bytes as lone surrogates ('\\udcff'), which no encoder, tokenizer or JSON file takes."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text, got {type(text).__name__}", field=what)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ConfigError(
            f"{what} is not valid UTF-8 text ({bad} at character {e.start + 1})", field=what
        ) from None


def warn_cut_prompts(encoder, texts: list[str], what: str = "--prompt") -> list[str]:
    """Say on stderr (one line each, the main process only) which of ``texts`` are longer than the text
    encoder's context: it sees only their start, so prompts that differ after it give the same samples.
    Returns those texts."""
    from ..encoders import context_length, token_count

    context = context_length(encoder)
    if context is None:
        return []
    cut = [t for t in dict.fromkeys(texts) if token_count(encoder, t) > context]
    if os.environ.get("RANK", "0") == "0":
        for text in cut:
            shown = text if len(text) <= 60 else text[:57] + "..."
            print(
                f"ddpm: warning: {what} {shown!r} is {token_count(encoder, text)} tokens long; the text "
                f"encoder's context is {context} (with its start and end tokens), so it is cut to fit and "
                "anything after that is ignored",
                file=sys.stderr,
            )
    return cut


def grid_prompts(cfg, captions: list[str] | None = None) -> list[str]:
    """The prompts of a text-conditional run's grids, a row each: "a photo of a(n) {class}" for each class
    where the data has classes, else its first 8 distinct (non-empty) captions."""
    if cfg.data.class_names:
        return [f"a photo of {article(name)} {name.lower()}" for name in cfg.data.class_names]
    return [c for c in dict.fromkeys(captions or []) if c][:8]


def balanced_classes(num: int, num_classes: int) -> torch.Tensor:
    """Class ids for ``num`` samples in equal contiguous blocks (example i gets i * K // num), so that a
    grid has one row per class and every class is equally represented (to within one)."""
    return torch.arange(num) * num_classes // num
