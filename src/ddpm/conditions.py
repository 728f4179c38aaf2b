"""What a run is conditioned on, and how a user's request (a class or a prompt, a guidance scale) becomes
the network a sampler calls.

Class ids are 0..K-1 in the order of ``cfg.data.class_names``; id K is the null class (the unconditional
branch that condition dropout trains). Guidance is Ho and Salimans' w (w = 0 is conditional sampling).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .captions import article
from .diffusion import VarType, parse_option
from .errors import ConfigError
from .guidance import check_guidance, guided


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


def check_text(text: str, what: str = "--prompt") -> None:
    """``text`` must be text: Python hands a command-line argument that is not valid UTF-8 over with its
    bad bytes as lone surrogates ('\\udcff'), which no encoder, tokenizer or JSON file takes."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ConfigError(f"{what} is not valid UTF-8 text ({bad} at character {e.start + 1})") from None


def warn_cut_prompts(encoder, texts: list[str], what: str = "--prompt") -> list[str]:
    """Say on stderr (one line each, the main process only) which of ``texts`` are longer than the text
    encoder's context: it sees only their start, so prompts that differ after it give the same samples.
    Returns those texts."""
    from .encoders import context_length, token_count

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


def check_request(
    cfg, class_name: str | int | None, guidance: float = 0.0, prompt: str | None = None
) -> int | None:
    """The class id asked for (None: none), after checking that this run can take the request."""
    check_guidance(guidance)
    if prompt is not None:
        check_text(prompt)
    if cfg.model.context_dim:
        if class_name is not None:
            raise ConfigError("this model is text-conditional: give --prompt, not --class")
        return None
    if prompt is not None:
        kind = "class-conditional: use --class" if cfg.model.num_classes else "unconditional"
        raise ConfigError(f"--prompt needs a text-conditional run; this one is {kind}")
    if cfg.model.num_classes == 0 and (class_name is not None or guidance):
        raise ConfigError("this model is unconditional: --class and --guidance need a conditional run")
    return None if class_name is None else class_index(cfg, class_name)


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


def guided_network(
    network,
    cfg,
    guidance: float,
    interval: tuple[int, int] | None = None,
    rescale: float = 0.0,
    null=None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``network(x, t, class_ids)`` (ids per example, or one int for all) guided with scale w away from
    the null class. With a learned variance only the prediction's channels are guided (the variance is
    the conditional branch's). ``null``: the null condition (default the null class; a text run's is an
    encoding of "" or of a negative prompt)."""
    learned = parse_option(VarType, cfg.diffusion.var_type, "variance type").learned
    channels = cfg.data.channels if learned else None
    null = cfg.model.num_classes if null is None else null

    def conditional(x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor | int) -> torch.Tensor:
        return guided(network, class_ids, null, guidance, channels, interval, rescale)(x, t)

    return conditional


def for_request(
    network,
    cfg,
    class_name: str | int | None = None,
    guidance: float = 0.0,
    prompt: str | None = None,
    checkpoint: str | Path = ".",
):
    """A plain ``(x, t)`` network for one requested class or prompt (guided with w), or, with neither,
    the null condition's (the unconditional branch). A text-conditional run's encoder is found from
    ``checkpoint`` (its run directory or checkpoint file)."""
    index = check_request(cfg, class_name, guidance, prompt)
    if cfg.model.context_dim:
        from .encoders import run_text_encoder

        run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        encoder = run_text_encoder(cfg, run_dir)
        null = encoder.encode([""])
        if prompt is not None:
            warn_cut_prompts(encoder, [prompt])
        if prompt is None:
            if guidance:
                raise ConfigError("--guidance needs --prompt (the text to guide towards)")
            return lambda x, t: network(x, t, null.to(x.device))
        text = encoder.encode([prompt])

        def prompted(x, t):
            conditional = guided_network(network, cfg, guidance, null=null.to(x.device))
            return conditional(x, t, text.to(x.device))

        return prompted
    if index is None:
        if guidance:
            raise ConfigError("--guidance needs --class (the class to guide towards)")
        return network
    conditional = guided_network(network, cfg, guidance)
    return lambda x, t: conditional(x, t, index)
