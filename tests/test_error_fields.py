"""Issue 22: the library's errors name the value at fault as the Python API calls it (DDPMError.field),
never a command-line flag; the CLI puts the flag of the command that sets it in its place."""

import ast
import re
from pathlib import Path

import pytest

import ddpm
from ddpm.cli.parser import build_parser, chosen_command, in_flags
from ddpm.errors import ConfigError, DataError

SRC = Path(ddpm.__file__).parent
FLAG = re.compile(r"--[a-z]")
# A whole command line quoted as `ddpm COMMAND ...` (or `pip install ...`) names the flags of that
# command: true advice for any user, a shell command to run. The library's own values are never named so.
QUOTED_COMMAND = re.compile(r"`(ddpm|pip) [^`]*`")


def _text(node) -> str:
    """A string constant, or an f-string with {} for its values; "" for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return ""


def _strings(node) -> list[str]:
    """Every string inside ``node``, an f-string whole (not its parts)."""
    if isinstance(node, ast.Constant | ast.JoinedStr):
        return [_text(node)] if _text(node) else []
    return [s for child in ast.iter_child_nodes(node) for s in _strings(child)]


def _name(func) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _messages(tree) -> set[tuple[int, str]]:
    """(line, text) of what an error's message is made of: the strings in a call of a ``...Error`` class,
    and those of the local names it uses (assigned, or looped over, in the same function); the strings
    handed to a ``check_*`` function (its ``what``) and the defaults of a ``check_*`` function's ``what``."""
    found = set()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for scope in [tree, *functions]:  # (the module's own names are not resolved: only a function's)
        values: dict[str, list] = {}
        for node in ast.walk(scope) if scope is not tree else ():
            if isinstance(node, ast.Assign | ast.For):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for name in (n for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
                    values.setdefault(name.id, []).append(
                        node.value if isinstance(node, ast.Assign) else node.iter
                    )
        for node in ast.walk(scope):
            if isinstance(node, ast.Call) and _name(node.func).endswith("Error"):
                parts = [*node.args, *(k.value for k in node.keywords)]
                used = {n.id for part in parts for n in ast.walk(part) if isinstance(n, ast.Name)}
                parts += [value for name in sorted(used) for value in values.get(name, [])]
                found |= {(node.lineno, s) for part in parts for s in _strings(part)}
            elif isinstance(node, ast.Call) and _name(node.func).startswith("check_"):
                found |= {(node.lineno, s) for arg in node.args[1:] for s in _strings(arg)}
    for node in functions:
        if node.name.startswith("check_") and node.args.defaults:
            args = node.args.args[-len(node.args.defaults) :]
            for arg, default in zip(args, node.args.defaults, strict=True):
                if arg.arg == "what":
                    found |= {(node.lineno, s) for s in _strings(default)}
    return found


def flags_in_messages(path: Path) -> list[str]:
    return [
        f"{path.relative_to(SRC)}:{line}: {text!r}"
        for line, text in sorted(_messages(ast.parse(path.read_text())))
        if FLAG.search(QUOTED_COMMAND.sub("", text))
    ]


def library_modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts[:1])


def test_library_errors_name_fields_not_flags():
    """No error raised outside ddpm.cli names a flag (``--out``): a Python user never typed one. It names
    the field (``out``, with DDPMError.field) and the CLI maps it to its flag."""
    found = [hit for path in library_modules() for hit in flags_in_messages(path)]
    assert not found, "\n".join(found)


def test_the_scan_finds_flags_in_messages():
    """The scan sees a flag in an error's f-string (parts joined), in a local message or a loop's values
    the error uses, and in a check_* function's ``what``; not in a quoted `ddpm` command line, nor in a
    warning."""
    source = """
def f(out, n, a, b):
    if n:
        raise ConfigError(f"{out} is a file; choose another -" f"-out, got {n}", field="out")
    refuse = "choose another --out"
    for flag, value in (("--domain-clip", a), ("b", b)):
        raise DataError(f"{flag} {value}: {refuse}")
    check_text(n, "--prompt")
    raise DataError(f"train it first with `ddpm train-autoencoder --out {out}`")
def check_x(v, what="--x"):
    print("warning: --steps is large")
"""
    texts = {text for _, text in _messages(ast.parse(source)) if FLAG.search(QUOTED_COMMAND.sub("", text))}
    assert texts == {
        "{} is a file; choose another --out, got {}",
        "choose another --out",
        "--domain-clip",
        "--prompt",
        "--x",
    }


# ---- in_flags: the CLI's words for a field ----


def command_flags(*argv: str) -> dict[str, str]:
    """dest -> flag of the command that ``argv`` runs."""
    parser = build_parser()
    return chosen_command(parser, parser.parse_args(list(argv)))[1]


def test_in_flags_names_the_flag_of_the_command_that_sets_the_field():
    sample = command_flags("sample", "runs/x")
    error = ConfigError("batch_size must be positive, got 0", field="batch_size")
    assert in_flags(error, sample) == "--batch-size must be positive, got 0"
    # a field whose flag's dest has another name (cli/flags.py FIELD_DESTS)
    error = ConfigError("out_dir runs/x is a file, not a directory", field="out_dir")
    assert in_flags(error, sample) == "--out runs/x is a file, not a directory"
    error = ConfigError("checkpoint c has no EMA weights: use its raw weights (use_ema)", field="use_ema")
    assert in_flags(error, sample) == "checkpoint c has no EMA weights: use its raw weights (--no-ema)"
    # several fields, each the first time it is named
    error = ConfigError(
        "prompts and negative_prompt need a text run: use class_name; prompts",
        field=("prompts", "negative_prompt", "class_name"),
    )
    assert in_flags(error, sample) == "--prompt and --negative-prompt need a text run: use --class; prompts"
    # only the first time it is named
    error = DataError("num 2 is fewer than the 3 prompts; num must be 3", field="num")
    assert in_flags(error, sample) == "--num 2 is fewer than the 3 prompts; num must be 3"


def test_in_flags_leaves_a_field_the_command_does_not_take():
    sample = command_flags("sample", "runs/x")
    error = ConfigError("frames must be at least 2, got 1", field="frames")  # figures' --frames
    assert in_flags(error, sample) == "frames must be at least 2, got 1"
    assert in_flags(ConfigError("estimate_steps must be in 2..10", field="estimate_steps"), sample) == (
        "estimate_steps must be in 2..10"
    )
    # no field; a positional argument (no flag); a config key (--set takes it as it is)
    assert in_flags(ConfigError("steps must be positive"), sample) == "steps must be positive"
    assert in_flags(ConfigError("checkpoint x is damaged", field="checkpoint"), sample) == (
        "checkpoint x is damaged"
    )
    assert in_flags(ConfigError("train.lr must be > 0", field="train.lr"), command_flags("train")) == (
        "train.lr must be > 0"
    )


def test_in_flags_never_rewrites_part_of_a_longer_word_or_a_path():
    shards = command_flags("make-shards", "images", "--out", "o")
    for message in (
        "the output folder is a file",  # out in output
        "out_dir is a file",
        "runs/out is a file",  # a path's part
        "runs/out/x is a file",
        "out/x is a file",
        "train.out is a file",
        "out-2 is a file",
        "C:\\out is a file",
    ):
        assert in_flags(DataError(message, field="out"), shards) == message
    error = DataError("/tmp/out/shards.json is not a ddpm shard index; choose another out", field="out")
    assert in_flags(error, shards) == "/tmp/out/shards.json is not a ddpm shard index; choose another --out"


# Each field that the library's errors name, and a command that reaches the error: its flag there.
FIELDS = [
    (("sample", "r"), "batch_size", "--batch-size"),  # ddpm.sample: out of memory
    (("sample", "r"), "num", "--num"),
    (("sample", "r"), "low_res_noise", "--low-res-noise"),
    (("sample", "r"), "prompts", "--prompt"),
    (("sample", "r"), "out_dir", "--out"),  # ddpm.files.OutputFolder
    (("sample", "r"), "use_ema", "--no-ema"),  # Checkpoint.weights
    (("generate", "p"), "out_dir", "--out"),
    (("generate", "p"), "num", "--num"),
    (("generate", "p"), "low_res_noise", "--low-res-noise"),
    (("eval", "nll", "r"), "num_images", "--num"),
    (("eval", "nll", "r"), "batch_size", "--batch-size"),
    (("eval", "nll", "r"), "estimate_steps", "--estimate-steps"),
    (("eval", "fid", "s"), "inception_weights", "--inception-weights"),
    (("eval", "fid", "s"), "data_dir", "--data-dir"),
    (("eval", "text", "s"), "per_prompt", "--per-prompt"),
    (("eval", "text", "s"), "domain_clip", "--domain-clip"),
    (("eval", "text", "s"), "data_dir", "--data-dir"),
    (("eval", "text", "s"), "prompts", "--prompt"),
    (("invert", "r"), "num", "--num"),
    (("invert", "r"), "batch_size", "--batch-size"),
    (("figures", "r"), "num", "--num"),
    (("figures", "r"), "frames", "--frames"),
    (("make-shards", "f", "--out", "o"), "shard_size", "--shard-size"),
    (("make-shards", "f", "--out", "o"), "out", "--out"),
    (("import", "f", "--out", "o"), "run_dir", "--out"),  # ddpm.convert.import_diffusers
    (("train",), "resume", "--resume"),
    (("train",), "data_dir", "--data-dir"),
    (("pipeline", "f", "--generator", "g"), "decoder", "--decoder"),
    (("pipeline", "f", "--generator", "g"), "text_encoder", "--text-encoder"),
]


@pytest.mark.parametrize(("argv", "field", "flag"), FIELDS, ids=[f"{a[0]}-{f}" for a, f, _ in FIELDS])
def test_every_field_the_library_names_is_a_flag_of_the_commands_that_reach_it(argv, field, flag):
    assert in_flags(ConfigError(f"{field} is wrong", field=field), command_flags(*argv)) == f"{flag} is wrong"


def test_the_library_names_the_field():
    """Errors of the Python API name its keywords, with the field set (the CLI tests check the flags)."""
    from ddpm.figures import make_figures
    from ddpm.invert import invert_to_dir
    from ddpm.shards import make_shards

    with pytest.raises(ConfigError, match="^frames must be at least 2, got 1$") as e:
        make_figures("runs/none", "out", frames=1)
    assert e.value.field == "frames"
    with pytest.raises(ConfigError, match="^batch_size must be positive, got 0$") as e:
        invert_to_dir("runs/none", "out", batch_size=0)
    assert e.value.field == "batch_size"
    with pytest.raises(DataError, match="^shard_size must be positive, got 0$") as e:
        make_shards("images", "out", shard_size=0)
    assert e.value.field == "shard_size"
