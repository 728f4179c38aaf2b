"""Every flag of every command at 0, -1, a huge value, nan, inf and invalid UTF-8: each is refused (exit
code 2, one line on stderr, no traceback, nothing written) or passes validation.

The cases come from the parser itself (``ddpm.cli.build_parser``): its subcommands and each one's
arguments, so a new flag is fuzzed without editing this file. Only the positional arguments (and the
data a command cannot run without) come from tiny fixtures, built once for the module.

A value that passes validation may start long work (``--steps 1e18``): the test stops it where the work
begins, at the first call of a denoiser (every command reaches its network through
``ddpm.runtime.wrap_network``) or of the domain classifier, and counts reaching that point as passing.
Everything a command checks before that point runs as it would from the shell."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import signal
import socket
import sys

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

import ddpm
from ddpm import cli, runtime
from ddpm.config import with_kind
from ddpm.train import Trainer

INVALID_UTF8 = "a\udcff"  # what Python makes of the bytes b"a\xff" in sys.argv
VALUES = {
    "0": "0",
    "-1": "-1",
    "huge": "1e30",
    "huge-int": str(10**18),  # fits an int64
    "huger-int": str(10**30),  # does not
    "nan": "nan",
    "inf": "inf",
    "utf8": INVALID_UTF8,
}


CASE_SECONDS = 30  # a case that reaches no refusal and no work within this long is a failure


class ReachedWork(BaseException):
    """Raised where a command's real work starts: everything before it passed validation."""


class TookTooLong(BaseException):
    """A case neither refused nor started work in CASE_SECONDS (e.g. a loop over a huge count)."""


def took_too_long(signum, frame):
    raise TookTooLong(f"no refusal and no work after {CASE_SECONDS} s")


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(words, parser) for every command: the subcommand words that reach it and its own parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*words, name))
            return
    yield words, parser


def takes_values(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))


def cases():
    for words, parser in commands(cli.build_parser()):
        for action in filter(takes_values, parser._actions):
            name = action.option_strings[0] if action.option_strings else action.dest
            values = {"utf8": INVALID_UTF8, "bogus": "bogus"} if action.choices else VALUES
            for label, value in values.items():
                yield pytest.param(words, name, value, id=f"{' '.join(words)} {name}={label}")


# ---- fixtures: a tiny run of every kind a command takes, built once ----


def write_config(path, cfg) -> str:
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, class_run, text_run):
    """The base argv of every command: its positional arguments and what it needs to run (data)."""
    base = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(class_run[0], base / "class-run")  # the session's runs are shared: copies
    shutil.copytree(text_run[0], base / "text-run")
    data, encoder = text_run[1], text_run[2]
    # a super-resolution stage 8 -> 16 for the text run, and the pipeline of the two
    cfg = tiny_config(data, steps=1)
    cfg.data.image_size, cfg.model.low_res, cfg.model.low_res_noise_max, cfg.model.low_res_noise = (
        16,
        8,
        20,
        5,
    )
    Trainer(cfg, base / "sr-run", progress=False).train()
    pipe = base / "pipeline"
    assert (
        cli.main(
            ["pipeline", str(pipe), "--generator", str(base / "text-run"), "--decoder", str(base / "sr-run")]
        )
        == 0
    )
    # an image folder, and a diffusers folder to import
    (base / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(base / "images" / f"{i}.png")
    from test_convert import tiny_unet, write_pipeline

    write_pipeline(base / "diffusers", tiny_unet(), num_train_timesteps=20)
    # training configs: a U-Net, an autoencoder and a text encoder, each tiny, on the tiny data
    unet = write_config(base / "unet.json", tiny_config(data))
    cfg = tiny_config(data)
    cfg.model = with_kind(cfg.model, "autoencoder")
    cfg.model.latent_channels = 2
    autoencoder = write_config(base / "autoencoder.json", cfg)
    cfg = tiny_config(data)
    cfg.model = with_kind(cfg.model, "text-encoder")
    cfg.data.labels, cfg.data.random_flip = "captions", False
    cfg.model.text_width, cfg.model.text_layers, cfg.model.text_heads = 32, 1, 2
    cfg.model.text_max_length, cfg.model.embed_dim, cfg.model.image_width = 40, 32, 8
    text_encoder = write_config(base / "text-encoder.json", cfg)
    class_run_dir, text_run_dir = str(base / "class-run"), str(base / "text-run")
    return base, {
        ("train",): ["--config", unet],
        ("train-autoencoder",): ["--config", autoencoder],
        ("train-text-encoder",): ["--config", text_encoder],
        ("config",): ["--config", unet],
        ("sample",): [text_run_dir],
        ("pipeline",): ["pipe", "--generator", text_run_dir, "--decoder", str(base / "sr-run")],
        ("generate",): [str(pipe)],
        ("invert",): [class_run_dir, "--steps", "10"],  # its default, 100, is more than the run's T
        ("make-shards",): [str(base / "images"), "--out", "shards"],
        ("import",): [str(base / "diffusers"), "--out", "imported"],
        ("export",): [class_run_dir, "--out", "exported"],
        ("serve",): [text_run_dir],
        ("eval", "fid"): [class_run_dir],
        ("eval", "nll"): [class_run_dir],
        ("eval", "text"): [text_run_dir, "--domain-clip", str(encoder)],
        ("train-classifier",): ["--data-dir", str(data), "--image-size", "8"],
        ("figures",): [class_run_dir],
        ("presets",): [],
    }


@pytest.fixture(scope="module")
def sealed(world):
    """No network, no cache outside the module's folder, and the real work stopped where it starts."""
    base, _ = world
    for module in pkgutil.iter_modules(ddpm.__path__):  # the modules the commands import when run
        if module.name != "__main__":
            importlib.import_module(f"ddpm.{module.name}")
    from ddpm import data, metrics

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    def stopped_network(*args, **kwargs):
        wrap(*args, **kwargs)  # its own checks (precision, compile mode) still run

        def network(*args, **kwargs):
            raise ReachedWork

        return network

    def stopped_forward(self, *args, **kwargs):
        raise ReachedWork

    wrap = runtime.wrap_network
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        hub = pytest.importorskip("huggingface_hub.constants")  # read when imported: set its flag too
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        mp.delenv("RANK", raising=False)
        for module in [ddpm, *(m for name, m in sys.modules.items() if name.startswith("ddpm."))]:
            if getattr(module, "wrap_network", None) is wrap:
                mp.setattr(module, "wrap_network", stopped_network)
            if getattr(module, "CACHE", None) == data.CACHE:
                mp.setattr(module, "CACHE", base / "cache")
        mp.setattr(metrics.DomainClassifier, "forward", stopped_forward)
        mp.setattr(ddpm.serve, "launch", stopped_forward)  # `ddpm serve`'s work: the page's server
        parser = cli.build_parser()
        mp.setattr(cli, "build_parser", lambda: parser)  # built once: the cases differ in argv only
        yield


def snapshot(*roots) -> set:
    """Every file and folder below ``roots`` with its size and modification time."""
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                stat = os.stat(os.path.join(folder, name))
                found.add((os.path.join(folder, name), stat.st_size, stat.st_mtime_ns))
    return found


def argv_for(words, base_argv, parser, flag=None, value=None) -> list[str]:
    """The command's base argv with ``flag`` (an option or a positional's dest) set to ``value``, and its
    outputs (--out, --cache-dir) in the current folder."""
    argv = list(base_argv)
    if flag is not None:
        action = next(
            a
            for a in parser._actions
            if flag in a.option_strings or (not a.option_strings and a.dest == flag)
        )
        values = [value] * (action.nargs if isinstance(action.nargs, int) else 1)
        if not action.option_strings:  # a positional: its place among the base argv's positionals
            index = [a for a in parser._actions if not a.option_strings and takes_values(a)].index(action)
            argv[index] = value
        elif flag in argv:
            at = argv.index(flag)
            argv[at + 1 : at + 1 + len(values)] = values
        else:
            argv += [flag, *values]
    options = {o for a in parser._actions for o in a.option_strings}
    for extra, what in (("--out", ["out"]), ("--cache-dir", ["cache"]), ("--no-progress", [])):
        if extra in options and extra not in argv:
            argv += [extra, *what]
    return [*words, *argv]


def run(argv) -> int | str:
    """``ddpm ARGV`` in this process: its exit code, or "work" where it got past validation."""
    previous = signal.signal(signal.SIGALRM, took_too_long)
    signal.alarm(CASE_SECONDS)  # a case that hangs fails alone, instead of stopping the run
    try:
        code = cli.main(argv)
    except ReachedWork:
        code = "work"
    except SystemExit as e:  # argparse's refusals
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code


@pytest.mark.parametrize("words", [words for words, _ in commands(cli.build_parser())], ids=" ".join)
def test_base_argv_passes_validation(words, world, sealed, tmp_path, monkeypatch, capsys):
    """Each command's fixtures are valid, so that a refusal below is the flag's."""
    monkeypatch.chdir(tmp_path)
    argv = argv_for(words, world[1][words], dict(commands(cli.build_parser()))[words])
    code = run(argv)
    assert code in ("work", 0), f"{argv!r} exited {code}: {capsys.readouterr().err}"


@pytest.mark.parametrize("words,flag,value", list(cases()))
def test_flag_is_refused_in_one_line_or_accepted(
    words, flag, value, world, sealed, tmp_path, monkeypatch, capsys
):
    base, base_argvs = world
    argv = argv_for(words, base_argvs[words], dict(commands(cli.build_parser()))[words], flag, value)
    monkeypatch.chdir(tmp_path)  # relative outputs land in the case's own folder
    before = snapshot(base, tmp_path)
    code = run(argv)
    err = capsys.readouterr().err
    if code in ("work", 0):
        return  # passed validation
    if code != 2:
        pytest.fail(f"{argv!r} exited {code}: {err}", pytrace=False)
    if "Traceback" in err or len(err.strip("\n").splitlines()) != 1:
        pytest.fail(f"{argv!r} was refused in more than one line:\n{err}", pytrace=False)
    if snapshot(base, tmp_path) != before:
        pytest.fail(f"{argv!r} was refused ({err.strip()}) but wrote", pytrace=False)
