import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main


def tiny_flags(idx_dir):
    return [
        "--data-dir",
        str(idx_dir),
        "--image-size",
        "8",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--set",
        "model.ch=8",
        "--set",
        "model.ch_mult=1,2",
        "--set",
        "model.num_res_blocks=1",
        "--set",
        "model.attn_resolutions=4",
        "--set",
        "model.num_groups=4",
        "--set",
        "diffusion.num_timesteps=20",
        "--set",
        "train.sample_every=1000",
        "--set",
        "train.num_sample_images=4",
        "--set",
        "train.sample_steps=5",
        "--no-progress",
    ]


def test_train_resume_and_sample(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_flags(idx_dir), "--out", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6

    out = tmp_path / "samples"
    args = [
        "sample",
        str(run),
        "--num",
        "5",
        "--batch-size",
        "2",
        "--seed",
        "7",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    npz = np.load(out / "samples.npz")["arr_0"]
    assert npz.shape == (5, 8, 8, 1) and npz.dtype == np.uint8
    assert len(list((out / "images").glob("*.png"))) == 5
    assert Image.open(out / "grid.png").size[0] > 8
    info = json.loads((out / "samples.json").read_text())
    assert info["seed"] == 7 and info["weights"] == "ema" and info["steps"] == 20
    # Same seed, same images; another seed, other images.
    assert main([*args[:-2], str(tmp_path / "again"), "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["arr_0"], npz)
    # The other fixed variance can be chosen at sampling time; it is recorded and changes the samples.
    assert main([*args[:-2], str(tmp_path / "large"), "--no-progress", "--var-type", "fixedlarge"]) == 0
    large = json.loads((tmp_path / "large" / "samples.json").read_text())
    assert large["var_type"] == "fixedlarge" and info["var_type"] == "fixedsmall"  # the preset's
    assert not np.array_equal(np.load(tmp_path / "large" / "samples.npz")["arr_0"], npz)
    assert (
        main(
            [
                "sample",
                str(run),
                "--num",
                "5",
                "--batch-size",
                "2",
                "--seed",
                "8",
                "--out",
                str(tmp_path / "other"),
                "--no-progress",
                "--steps",
                "4",
            ]
        )
        == 0
    )
    assert not np.array_equal(np.load(tmp_path / "other" / "samples.npz")["arr_0"], npz)


def test_toy2d_trains_and_plots(tmp_path):
    run = tmp_path / "toy"
    flags = [
        "--preset",
        "toy2d",
        "--dataset",
        "moons",
        "--steps",
        "20",
        "--set",
        "train.num_sample_images=50",
        "--set",
        "data.num_points=200",
        "--set",
        "diffusion.num_timesteps=30",
        "--no-progress",
    ]
    assert main(["train", *flags, "--out", str(run)]) == 0
    assert (run / "samples" / "step_0000020.png").is_file()
    assert main(["sample", str(run), "--num", "10", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert np.load(tmp_path / "s" / "points.npy").shape == (10, 2)
    assert (tmp_path / "s" / "points.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--preset", "imagenet64"], "unknown preset"),
        (["train", "--set", "diffusion.num_timesteps=0"], "num_timesteps must be positive"),
        (["train", "--set", "diffusion.beta_end=1.5"], "beta_end must be in (0, 1)"),
        (["train", "--image-size", "30"], "multiple of 4"),
        (["train", "--set", "train.lrr=1"], "unknown config key"),
        (["train", "--set", "train.lr=fast"], "expects float"),
        (["train", "--dataset", "folder"], "needs a data directory"),
        (["train", "--dataset", "folder", "--data-dir", "/nonexistent/dir"], "does not exist"),
        (["sample", "/nonexistent/run"], "no checkpoint"),
        (["import", "/nonexistent/folder", "--out", "x"], "not a directory"),
        (["train", "--config", "/nonexistent.toml"], "does not exist"),
        (["train", "--set", "train.log_every=0"], "log_every must be positive"),
        (["train", "--set", "model.num_groups=0"], "num_groups"),
        (["train", "--set", "diffusion.loss_type=hybrid"], "hybrid"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error:") and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_unreadable_image_is_named(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                str(tmp_path / "imgs"),
                "--image-size",
                "8",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "broken.jpg" in capsys.readouterr().err


def test_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm.cli", "sample", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_out_that_is_a_file_is_one_line_error(idx_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    assert main(["train", *tiny_flags(idx_dir), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error:") and "\n" not in err


def test_paper_reproduction_sequence_on_a_random_cifar10_network(tmp_path, inception_weights):
    """docs/reproducing.md: import -> eval nll -> eval fid (sampling included), on the real
    CIFAR-10 architecture (random weights, saved in the layout of google/ddpm-cifar10-32), a fake
    CIFAR-10 binary release and a random Inception network saved like torch-fidelity's weights."""
    from diffusers import DDPMScheduler
    from test_unet import diffusers_paper_unet

    torch.manual_seed(0)
    folder = tmp_path / "ddpm-cifar10-32"
    diffusers_paper_unet().save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small").save_pretrained(folder / "scheduler")
    data = tmp_path / "cifar" / "cifar-10-batches-bin"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rng.integers(0, 256, size=(2, 3073), dtype=np.uint8).tofile(data / name)

    run = tmp_path / "official"
    assert main(["import", str(folder), "--out", str(run)]) == 0
    argv = [
        "eval",
        "nll",
        str(run),
        "--data-dir",
        str(tmp_path / "cifar"),
        "--var-type",
        "fixedlarge",
        "--estimate-steps",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads((run / "nll-test" / "nll.json").read_text())
    assert summary["num_images"] == 2 and summary["var_type"] == "fixedlarge" and summary["nll_bpd"] > 0
    argv = ["eval", "fid", str(run), "--num", "2", "--steps", "2", "--var-type", "fixedlarge", "--split"]
    argv += ["train", "--data-dir", str(tmp_path / "cifar"), "--inception-weights", str(inception_weights)]
    assert main(argv + ["--cache-dir", str(tmp_path / "stats"), "--no-progress"]) == 0
    (samples,) = run.glob("fid-samples-2-*")
    assert np.load(samples / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)
    result = json.loads((samples / "fid-inception-v3-compat-train.json").read_text())
    assert result["reference"] == {"dataset": "cifar10", "split": "train", "num_images": 10}
    assert result["sampling"]["var_type"] == "fixedlarge" and result["sampling"]["steps"] == 2
    assert result["fid"] > 0 and result["num_samples"] == 2


def test_every_command_that_runs_a_network_takes_the_runtime_flags_alike(tmp_path, monkeypatch):
    """--device, --precision, --channels-last, --compile and --compile-mode: declared once (cli/flags.py) with
    one help text and Runtime()'s defaults, taken by every command that runs a network, and parsed into
    the one Runtime value that the command hands on."""
    from ddpm import cli, pipeline
    from ddpm.cli import flags, options
    from ddpm.runtime import Runtime

    def subcommand(parser, *words):
        for word in words:
            action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = action.choices[word]
        return parser

    parser = cli.build_parser()
    commands = {
        ("sample",): ["RUN"],
        ("generate",): ["PIPE"],
        ("invert",): ["RUN"],
        ("eval", "fid"): ["RUN"],
        ("eval", "nll"): ["RUN"],
        ("eval", "text"): ["RUN"],
        ("figures",): ["RUN"],
    }
    speed = ["--device", "cpu", "--precision", "bf16", "--channels-last", "--compile"]
    speed += ["--compile-mode", "reduce-overhead"]
    expected = Runtime("cpu", "bf16", True, True, "reduce-overhead")
    for words, positional in commands.items():
        taken = {a.option_strings[0]: a for a in subcommand(parser, *words)._actions if a.option_strings}
        for name in flags.RUNTIME_FLAGS:
            assert taken[name].help == flags.keywords(name)["help"], (words, name)
            assert taken[name].default == getattr(Runtime(), taken[name].dest), (words, name)
        assert options.runtime(parser.parse_args([*words, *positional])) == Runtime()
        args = parser.parse_args([*words, *positional, *speed])
        assert options.runtime(args) == expected, words
        if words != ("generate",) and hasattr(args, "sampler") and hasattr(args, "batch_size"):
            assert options.sample_options(args).runtime == expected, words
    # generate hands them to both of its stages
    stages = []
    monkeypatch.setattr(pipeline, "generate_to_dir", lambda *a, **k: stages.append(k) or {})
    assert main(["generate", str(tmp_path), *speed, "--out", str(tmp_path / "out")]) == 0
    assert [stages[0][k].runtime for k in ("generator_options", "decoder_options")] == [expected] * 2


# ---- the flag table (cli/flags.py): every argument declared once ----


def every_command(parser, words=()):
    """(words, parser) for every command, sub-commands included (`eval fid`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_command(sub, (*words, name))
            return
    yield words, parser


def arguments(parser) -> dict:
    """A parser's arguments, by the name the flag table knows them by (``--num``, ``checkpoint``)."""
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return {
        a.option_strings[0] if a.option_strings else a.dest: a
        for a in parser._actions
        if not isinstance(a, skip)
    }


def described(action) -> tuple:
    """What an argument is to its user: names, where it goes, type, default, choices and help."""
    fields = ("option_strings", "dest", "nargs", "const", "default", "type", "choices", "required", "help")
    return (type(action).__name__, *(repr(getattr(action, f)) for f in fields), repr(action.metavar))


def declared(name: str) -> dict:
    """Each meaning the table declares for ``name`` (``name`` or ``name:meaning``), as argparse makes it."""
    from ddpm.cli import flags

    entry = flags.FLAGS[name]
    specs = [name] if isinstance(entry, dict) else [name] * (entry.usual is not None)
    specs += [f"{name}:{meaning}" for meaning in getattr(entry, "meanings", {})]
    made = {}
    for spec in specs:
        parser = argparse.ArgumentParser(add_help=False)
        flags.add_flags(parser, spec)
        made[spec] = arguments(parser)[name]
    return made


# The flags that mean something else in some commands (another default, another help text), each meaning
# named in cli/flags.py. A flag joins this list only for a reason: one name for two meanings is what
# issue 22 is removing.
# The flags whose meaning differs between commands, each meaning declared in cli/flags.py:
# - a training command's flag leaves the config's value when unset; the same flag elsewhere has a default
#   of its own (--seed, --device, --precision, --batch-size, --steps, --dataset, --data-dir, --image-size);
# - what a command makes or reads differs (--out, --num, --steps of invert and generate, the positionals);
# - the commands that draw many images take every class or several prompts, those that follow one chain
#   per image (invert, figures, eval nll) one, defaulting to the unconditional branch (--class, --prompt);
# - generate's pipeline samples with DDIM in 50 steps (--sampler).
SEVERAL_MEANINGS = {"folder", "source", "--dataset", "--data-dir", "--image-size", "--steps", "--batch-size"}
SEVERAL_MEANINGS |= {
    "--seed",
    "--device",
    "--precision",
    "--out",
    "--num",
    "--sampler",
    "--class",
    "--prompt",
}


def test_every_argument_is_declared_once_in_the_flag_table():
    """cli/flags.py declares every argument of every command, each name once (with its other option
    strings), and no other CLI module adds an argument of its own."""
    from ddpm import cli
    from ddpm.cli import flags

    source = Path(flags.__file__).read_text()
    table = next(
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FLAGS"
    )
    names = [key.value for key in table.keys]
    assert len(names) == len(set(names)) and set(names) == set(flags.FLAGS)
    others = {o for name in names for action in declared(name).values() for o in action.option_strings[1:]}
    assert others == {"--num-samples"} and not others & set(names)
    for path in Path(cli.__file__).parent.glob("*.py"):
        if path.name != "flags.py":
            assert "add_argument(" not in path.read_text(), path.name
    taken = set()
    for words, parser in every_command(cli.build_parser()):
        for name in arguments(parser):
            assert name in flags.FLAGS, (words, name)
            taken.add(name)
    assert taken == set(flags.FLAGS)  # nothing declared that no command takes


def test_a_flag_means_the_same_in_every_command_unless_the_table_names_another_meaning():
    """A flag that two commands take has the same help text, default and type in both, or the table
    declares each meaning under its own name (`--steps:invert`); and every declared meaning is used."""
    from ddpm import cli
    from ddpm.cli import flags

    seen: dict[str, dict[tuple, list]] = {}
    for words, parser in every_command(cli.build_parser()):
        for name, action in arguments(parser).items():
            seen.setdefault(name, {}).setdefault(described(action), []).append(" ".join(words))
    for name, versions in seen.items():
        meanings = {described(action) for action in declared(name).values()}
        assert set(versions) <= meanings, f"{name}: a meaning the flag table does not declare"
        assert set(versions) == meanings, f"{name}: a declared meaning that no command takes"
        if name not in SEVERAL_MEANINGS:
            assert len(versions) == 1, f"{name} means different things in {list(versions.values())}"
    assert {name for name in flags.FLAGS if len(declared(name)) > 1} == SEVERAL_MEANINGS
    # --guidance-interval (declared twice before issue 22) is one flag in sample, eval and generate
    assert len(seen["--guidance-interval"]) == 1 and len(sum(seen["--guidance-interval"].values(), [])) == 4


def test_the_config_shortcuts_come_from_the_flag_table():
    """The training commands' shortcut flags set the config keys the table names, in its order."""
    from ddpm.cli import flags

    assert list(flags.CONFIG_KEYS.items()) == list(
        {
            "dataset": "data.dataset",
            "data_dir": "data.root",
            "image_size": "data.image_size",
            "channels": "data.channels",
            "steps": "train.steps",
            "batch_size": "train.batch_size",
            "lr": "train.lr",
            "seed": "train.seed",
            "device": "train.device",
            "precision": "train.precision",
            "time_limit": "train.time_limit_minutes",
            "budget": "train.budget_minutes",
            "no_tensorboard": "train.tensorboard",
            "tokenizer": "model.tokenizer",
        }.items()
    )


def test_long_commands_show_a_progress_bar_and_no_progress_hides_it(class_run, tmp_path, capsys):
    """invert, figures, make-shards (and eval's bootstrap) show a bar with its rate and ETA on stderr."""
    run, data = class_run
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    commands = {
        "invert": ["invert", str(run), "--num", "2", "--steps", "3", "--data-dir", str(data)],
        "figures": ["figures", str(run), "--figure", "forward", "--figure", "progressive", "--frames", "2"],
        "shards": ["make-shards", str(tmp_path / "images")],
    }
    commands["figures"] += ["--data-dir", str(data), "--num", "2"]
    for bar, argv in commands.items():
        out = ["--out", str(tmp_path / bar)]
        assert main([*argv, *out]) == 0
        err = capsys.readouterr().err
        assert re.search(rf"{bar}: 100%.*\[\d\d:\d\d<00:00", err), err[-300:]
        assert main([*argv, *out, "--no-progress"]) == 0
        assert f"{bar}:" not in capsys.readouterr().err
