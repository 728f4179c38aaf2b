"""The `ddpm` command line (train, sample, invert, import, eval, figures, ...): it parses and calls.

flags.py declares every argument once; parser.py assembles the commands, each in its own module
(train.py, sample.py, pipeline.py, invert.py, evaluate.py, figures.py, convert.py, config.py), which turns
its parsed flags into one library call and prints one JSON line. Here: the library's errors as one line
and an exit code."""

from __future__ import annotations

import os
import sys

from ..errors import DDPMError
from ..runtime import finish_processes, keep_freed_memory
from .parser import build_parser, chosen_command, in_flags, refuse_invalid_utf8

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        refuse_invalid_utf8(parser, args)  # before anything is read or written
    except SystemExit as e:  # a refusal (2, its one line said) or --help (0): a code, as below
        return e.code if isinstance(e.code, int) else 0
    # Under torchrun every process meets the same error: rank 0 alone says it.
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    keep_freed_memory()  # ~20% faster sampling on the CPU (see its docstring)
    try:
        code = args.func(args)
        finish_processes()  # under torchrun: after every process is done
        return code
    except DDPMError as e:
        say(f"ddpm: error: {in_flags(e, chosen_command(parser, args)[1])}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out names an existing file, a full disk, no permission
        say(f"ddpm: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except FloatingPointError as e:
        advice = "lower the learning rate, train in fp32 if it was bf16, or set train.on_nonfinite=skip"
        say(f"ddpm: error: {e}; {advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        trains = args.command in ("train", "train-autoencoder", "train-text-encoder")
        kept = "; the last checkpoint is kept (continue with --resume)" if trains else ""
        say(f"ddpm: interrupted{kept}", file=sys.stderr)
        return 130
