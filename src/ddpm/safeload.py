"""Reading weights without running code.

Nothing ddpm loads may execute code: its own files are safetensors; a torch file (``.pth`` / ``.bin``, a
pickle) is read only through ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain
containers and refuses every other global, and only on torch >= 2.6 (before it, CVE-2025-32434 let a
file run code even then); third-party model folders (transformers, diffusers) are read from safetensors
only, since their libraries would otherwise unpickle ``pytorch_model.bin`` themselves.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path

import torch

from .errors import DataError, first_line

SAFE_TORCH_LOAD = (2, 6)  # the first torch whose weights-only unpickler has no known way to run code

TRANSFORMERS_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TRANSFORMERS_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DIFFUSERS_SAFETENSORS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)
DIFFUSERS_PICKLES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_safetensors(path: str | Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= Path(path).stat().st_size - 8


def torch_load_is_safe(version: str | None = None) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version or torch.__version__)
    return bool(match) and (int(match[1]), int(match[2])) >= SAFE_TORCH_LOAD


def _refusal(e: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in a few words."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"its pickle calls {found[1]}, which could run code"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"a pickle the weights-only loader does not read (opcode {found[1]}), or not a torch file"
    return "torch's weights-only loader found more than tensors in it"


def load_state_dict(
    path: str | Path, source: str, kind: str = "a state dict", error: type[Exception] = DataError
) -> dict[str, torch.Tensor]:
    """A state dict (names to tensors) from a safetensors file or a torch file, on the CPU, never
    running code from it. ``source`` names the file in errors, ``kind`` what it should be (``"an
    InceptionV3 state dict"``); errors are one line of ``error``."""
    path = Path(path)
    try:
        safetensors = is_safetensors(path)
    except OSError as e:
        raise error(f"cannot read {source} ({e.strerror or e})") from None
    if safetensors:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise error(f"{source} is not {kind} (a damaged safetensors file: {first_line(e)})") from None
    if not torch_load_is_safe():
        raise error(
            f"{source} is a pickle-based torch file, which torch {torch.__version__} cannot read without "
            "the risk of running code in it; use torch>=2.6 or a safetensors copy"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one line of error is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(f"{source} was refused unread: {_refusal(e)}; only tensors are loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise error(f"{source} is not {kind} (cannot read it as a torch file: {first_line(e)})") from None
    if not isinstance(state, dict):
        raise error(f"{source} is not {kind} (it holds a {type(state).__name__})")
    wrong = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if wrong:
        raise error(f"{source} is not {kind} ({wrong[0]!r} is not a named tensor)")
    return state


def refuse_pickled_folder(
    folder: str | Path,
    safe_names: tuple[str, ...],
    pickled_names: tuple[str, ...],
    source: str,
    error: type[Exception] = DataError,
) -> None:
    """Before a library's ``from_pretrained(use_safetensors=True)``: a local folder whose weights exist
    only as a torch pickle is one clear error (the library would say only that safetensors are missing).
    Hub names (not local folders) are left to the library, which then fetches safetensors only."""
    folder = Path(folder)
    if not folder.is_dir() or any((folder / name).is_file() for name in safe_names):
        return
    pickled = next((name for name in pickled_names if (folder / name).is_file()), None)
    if pickled is not None:
        raise error(
            f"{source} has its weights only in {pickled}, a pickle, which ddpm does not load (it could "
            f"run code); convert it to {safe_names[0]} where you trust the file"
        )
