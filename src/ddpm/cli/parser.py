"""The parser: one-line errors (exit code 2), every command's sub-parser from its module, and the refusal
of arguments that are not valid UTF-8."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import DDPMError
from . import config, convert, evaluate, figures, invert, pipeline, sample, serve, train
from .flags import FIELD_DESTS

# `ddpm --help` lists the commands in this order
COMMANDS = (
    train.add_train,
    train.add_train_autoencoder,
    sample.add_sample,
    pipeline.add_pipeline,
    pipeline.add_generate,
    serve.add_serve,
    invert.add_invert,
    convert.add_make_shards,
    convert.add_import,
    convert.add_export,
    evaluate.add_eval,
    evaluate.add_train_classifier,
    train.add_train_text_encoder,
    figures.add_figures,
    config.add_presets,
    config.add_config,
)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``ddpm: error: ...`` and exit code 2, no usage block
    (``--help`` still shows it). The subcommands' parsers are of this class too."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
            line = f"ddpm: error: {message} (see `{self.prog} --help`)"
            # a value that is not valid UTF-8 is shown escaped (a terminal may not take it as it is)
            sys.stderr.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def chosen_command(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The (sub)command parser that ``args`` were parsed by, and its arguments: dest -> the flag (its
    first option string) or, for a positional argument, its name."""
    names, chosen, command = {}, [parser], parser
    while chosen:  # the parser, then the subcommand's parser (and its own subcommand's)
        command = chosen.pop()
        for action in command._actions:
            names.setdefault(action.dest, action.option_strings[0] if action.option_strings else action.dest)
            if isinstance(action, argparse._SubParsersAction):
                chosen.append(action.choices[getattr(args, action.dest)])
    return command, names


def in_flags(error: DDPMError, flags: dict[str, str]) -> str:
    """``error``'s message as the command line says it: the field it names (see DDPMError) replaced by
    the flag that sets it, where the command has one (``flags``: dest -> flag, as chosen_command gives).
    Only the field as a word of its own: not part of a longer word (``out`` in ``output``, ``out_dir``,
    ``train.out``) or of a path (``runs/out/x``)."""
    message = str(error)
    for field in (error.field,) if isinstance(error.field, str) else error.field or ():
        flag = flags.get(FIELD_DESTS.get(field, field))
        if flag is not None and flag.startswith("-"):
            word = rf"(?<![\w./\\-]){re.escape(field)}(?![\w/\\-])"
            message = re.sub(word, lambda _, flag=flag: flag, message, count=1)
    return message


def refuse_invalid_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2, one line) a flag or positional argument whose value was not valid UTF-8 on the
    command line (Python holds such bytes as surrogate escapes): e.g. a path or a prompt in another
    encoding, which would fail later when written or printed."""
    from ..conditioning import check_text

    command, names = chosen_command(parser, args)
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list | tuple) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    check_text(text, names.get(dest, dest))
                except DDPMError as e:
                    command.error(str(e))
