"""The `ddpm` command line (train, sample, invert, import, eval, figures, ...): parse and call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from .config import COMPILE_MODES, MAX_BATCH_SIZE, MAX_IMAGE_SIZE, PRECISIONS, check_seed
from .errors import DDPMError
from .runtime import Runtime, finish_processes, keep_freed_memory
from .sample import SampleOptions
from .samplers import SAMPLERS, SPACINGS

SAMPLE_DEFAULTS = SampleOptions()
RUNTIME_DEFAULTS = Runtime()

# ---- argument types: argparse refuses a bad count itself, naming the flag, in one line (the config's
# numbers are checked with the config, and the sampling ones with the run: ddpm.sample, ddpm.conditions) ----

INT64_MAX = 2**63 - 1  # what a tensor, a seed or a JSON reader downstream can hold
MAX_IMAGES = 10**6  # images `invert` and `eval nll` take (--num): more than any split holds


def integer(low: int = 0, high: int = INT64_MAX):
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < low:
            least = "positive" if low == 1 else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {least}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


positive = integer(1)
batch_size = integer(1, MAX_BATCH_SIZE)
image_count = integer(1, MAX_IMAGES)
image_size = integer(1, MAX_IMAGE_SIZE)
figure_count = integer(2, 1000)  # images in a figure's row or column

# Flags that are shortcuts for config keys.
SHORTCUTS = {
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
    "tokenizer": "model.tokenizer",
}

# Flags that several subcommands take, declared once: name -> argparse keywords.
FLAGS = {
    "--device": dict(default=RUNTIME_DEFAULTS.device, help="auto (default), cpu, cuda or cuda:N"),
    "--precision": dict(
        choices=PRECISIONS,
        default=RUNTIME_DEFAULTS.precision,
        help="bf16 runs the network under autocast: faster, not bit-identical to fp32; bf16-norm also "
        "keeps GroupNorm in bf16 (no casts around it on CUDA) (default fp32)",
    ),
    "--channels-last": dict(action="store_true", help="NHWC layout for the network (speed option)"),
    "--compile": dict(action="store_true", help="torch.compile the network (speed option)"),
    "--compile-mode": dict(
        choices=COMPILE_MODES,
        default=RUNTIME_DEFAULTS.compile_mode,
        help="torch.compile's mode with --compile: reduce-overhead replays CUDA graphs (default: default)",
    ),
    "--no-ema": dict(action="store_true", help="use the raw weights instead of the EMA"),
    "--data-dir": dict(help="where the dataset is (default: as in the run's config)"),
    "--no-progress": dict(action="store_true", help="no progress bar"),
    "--var-type": dict(
        choices=("fixedsmall", "fixedlarge"),
        help="use this fixed reverse variance instead of the checkpoint's",
    ),
    "--spacing": dict(
        choices=SPACINGS,
        help="which timesteps --steps keeps: linspace (0 and T-1 included; default for ancestral and ddim), "
        "leading, trailing, or logsnr (even in log-SNR; default for dpm++2m)",
    ),
    "--seed": dict(type=int, default=0),  # 0..2**63-1: checked by the commands (check_seed)
    "--batch-size": dict(type=batch_size, default=64),
    "--split": dict(default="test", choices=("train", "test"), help="the data split (default test)"),
    "--cache-dir": dict(
        help="cache of the domain classifier / Inception reference statistics (default ~/.cache/ddpm)"
    ),
    "--no-clip": dict(action="store_true", help="do not clip the predicted x0 to [-1, 1]"),
    "--class": dict(
        dest="class_name",
        help="class-conditional runs: condition on this class (name or index); default: the null class "
        "(the model's unconditional branch)",
    ),
    "--prompt": dict(
        help="text-conditional runs: condition on this text; default: the empty text (unconditional branch)"
    ),
    "--guidance": dict(
        type=float,  # bounds: ddpm.conditions
        default=0.0,
        metavar="W",
        help="classifier-free guidance, Ho and Salimans' w: 0 (default) is plain conditional sampling",
    ),
}


# Where and how a command runs its network (ddpm.runtime.Runtime): every command that runs one takes them all.
RUNTIME_FLAGS = ("--device", "--precision", "--channels-last", "--compile", "--compile-mode")


def _add(p: argparse.ArgumentParser, *names: str, **changes) -> None:
    """Add the shared flags ``names``; ``changes`` (keyed by the flag's dest) adjusts one's keywords."""
    for name in names:
        dest = FLAGS[name].get("dest", name.lstrip("-").replace("-", "_"))
        p.add_argument(name, **{**FLAGS[name], **changes.get(dest, {})})


def _add_checkpoint(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("checkpoint", help="a run directory or a checkpoint.safetensors file")
    p.add_argument("--out", help=f"output directory (default RUN_DIR/{default_out})")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="start from a preset (see `ddpm presets`); default fashion-mnist")
    p.add_argument("--config", help="a JSON or TOML config file (may name its own preset)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set model.dropout=0.1 (repeatable)",
    )
    p.add_argument(
        "--dataset", help="fashion-mnist, mnist, cifar10, folder, shards, swiss-roll, s-curve or moons"
    )
    p.add_argument("--data-dir", help="data directory (image folder, or where the dataset files are)")
    # (their ranges are the config's: ddpm.config.validate names the key)
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3; default: the data's own")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    # No defaults here: an unset flag leaves the config's value.
    keep = " (default: the config's)"
    device = dict(default=None, help="auto, cpu, cuda or cuda:N" + keep)
    precision = dict(default=None, help="fp32, bf16 autocast, or bf16-norm (GroupNorm in bf16 too)" + keep)
    _add(p, "--device", "--precision", device=device, precision=precision)
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop training after this long")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """What every training command takes: the config flags, where the run goes, resuming."""
    _add_config_flags(p)
    p.add_argument("--out", help="run directory (default runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    _add(p, "--no-progress", "--cache-dir")  # (the cache: for an autoencoder's report at its finish)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How to sample: shared by `sample` and `eval fid CHECKPOINT`."""
    p.add_argument("--steps", type=positive, help="sampling steps on a subset of timesteps (default: all T)")
    p.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        default="ancestral",
        help="; ".join(f"{name}: {sampler.summary}" for name, sampler in SAMPLERS.items())
        + " (default ancestral)",
    )
    p.add_argument(
        "--eta",
        type=float,  # bounds: the sampler's (ddpm.samplers.check_eta)
        help="noise level: DDIM's (0 deterministic, the default; 1 = ancestral fixed-small) or the SDE "
        "solvers' (1 the reverse SDE, the default; 0 the ODE; more adds noise)",
    )
    no_clip = dict(help="do not clip the predicted x0 to [-1, 1] (2-D points are never clipped)")
    _add(p, "--no-clip", no_clip=no_clip)
    _add(p, "--batch-size", "--seed", "--spacing", "--no-ema", *RUNTIME_FLAGS, "--var-type")
    every_class = "class-conditional runs: sample this class (name or index); default: every class in "
    _add(p, "--class", "--guidance", class_name=dict(help=every_class + "equal blocks, one grid row each"))
    p.add_argument(
        "--guidance-interval",
        type=int,  # bounds: the run's timesteps (ddpm.sample)
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only at model timesteps LO..HI (0-based; outside, the conditional model alone)",
    )
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="CFG rescale (Lin et al. 2024), 0 (off) to 1",
    )
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="text-conditional runs: a prompt (repeatable: the samples are split into equal blocks, a grid "
        "row per prompt; default 'a photo of a CLASS' for each class of the data)",
    )
    p.add_argument(
        "--negative-prompt", help="text-conditional runs: guide away from this text (default: the empty text)"
    )
    p.add_argument(
        "--low-res",
        metavar="SAMPLES",
        help="super-resolution stages: the low-resolution images to upsample (samples.npz or its folder, "
        "e.g. a base model's `ddpm sample` output; larger images are downsampled first)",
    )
    p.add_argument(
        "--low-res-noise",
        type=int,  # bounds: the stage's timesteps (ddpm.sample)
        metavar="LEVEL",
        help="super-resolution stages: the augmentation noise level of the low-resolution input "
        "(0 = clean; default the stage's model.low_res_noise)",
    )


def _config_values(args) -> dict:
    """The shortcut flags as config keys (None for those not given)."""
    return {key: getattr(args, flag, None) for flag, key in SHORTCUTS.items()}


def _runtime(args) -> Runtime:
    """The RUNTIME_FLAGS as one value."""
    return Runtime(args.device, args.precision, args.channels_last, args.compile, args.compile_mode)


def _sample_options(args):
    """The sampling flags; `ddpm sample`'s --num is the number of samples (eval fid decides its own)."""
    return SampleOptions(
        num=args.num if args.command == "sample" else SAMPLE_DEFAULTS.num,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        spacing=args.spacing,
        clip_denoised=False if args.no_clip else None,  # None: clip images, never points
        use_ema=not args.no_ema,
        var_type=args.var_type,
        **dataclasses.asdict(_runtime(args)),  # SampleOptions' fields of the same names
        progress=not args.no_progress,
        class_name=args.class_name,
        guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        guidance_rescale=args.guidance_rescale,
        prompts=tuple(args.prompts) if args.prompts else None,
        negative_prompt=args.negative_prompt,
        low_res=args.low_res,
        low_res_noise=args.low_res_noise,
    )


def _output_dir(args, default_name: str) -> Path:
    """--out, or ``default_name`` inside the run directory of the checkpoint argument."""
    if args.out:
        return Path(args.out)
    source = Path(args.checkpoint)
    return (source if source.is_dir() else source.parent) / default_name


def _print(**result) -> int:
    print(json.dumps(result))
    return 0


# ---- the commands: parse, call, print one JSON line ----


def cmd_train(args, kind: str | None = None) -> int:
    """`ddpm train`; with ``kind`` (train-autoencoder, train-text-encoder) the config must build that kind of
    model."""
    from .checkpoint import CHECKPOINT_NAME, Checkpoint
    from .config import Config
    from .errors import ConfigError
    from .presets import resolve_config
    from .train import Trainer

    values = _config_values(args)
    if kind is not None and not (args.resume or args.preset or args.config):
        args.preset = f"fashion-mnist-{kind}"
    if args.resume:
        run_dir = Path(args.resume)
        base = Config.from_dict(Checkpoint(run_dir / CHECKPOINT_NAME).request)  # as the run was asked
        cfg = resolve_config(base, args.preset, args.config, values, args.set)
    else:
        cfg = resolve_config(None, args.preset, args.config, values, args.set)
        run_dir = Path(args.out or f"runs/{cfg.name}")
    if kind is not None and cfg.model.kind != kind:
        raise ConfigError(f"`ddpm train-{kind}` trains model.kind={kind}; this config's is {cfg.model.kind}")
    trainer = Trainer(
        cfg,
        run_dir,
        resume=bool(args.resume),
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
    )
    result = trainer.train()  # (a finished run is finished by its task: a report, an export)
    if not trainer.procs.is_main:
        return 0
    _print(run_dir=str(run_dir), **result)
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        print(
            f"ddpm: stopped by {result['stopped']} at step {result['step']} with a checkpoint; "
            f"continue with: ddpm {args.command} --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + signal.Signals[result["stopped"]].value
    return 0


def cmd_sample(args) -> int:
    from .sample import sample_to_dir

    out = _output_dir(args, "samples-out")
    info = sample_to_dir(args.checkpoint, out, _sample_options(args))
    return 0 if info is None else _print(out_dir=str(out), **info)  # None: not the main process


def cmd_pipeline(args) -> int:
    from .pipeline import PIPELINE_FILE, Pipeline

    pipeline = Pipeline.write(args.folder, args.generator, args.decoder, args.text_encoder, args.decoder_kind)
    return _print(
        pipeline=str(Path(args.folder) / PIPELINE_FILE), parts=[p.describe() for p in pipeline.parts]
    )


def cmd_generate(args) -> int:
    from .pipeline import generate_to_dir

    def stage(steps, sampler, **extra):  # one stage's sampling options
        return SampleOptions(
            steps=steps,
            sampler=sampler,
            batch_size=args.batch_size,
            **dataclasses.asdict(_runtime(args)),  # SampleOptions' fields of the same names
            progress=not args.no_progress,
            **extra,
        )

    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    generator = stage(
        args.steps, args.sampler, guidance_interval=interval, negative_prompt=args.negative_prompt
    )
    decoder = stage(args.decoder_steps, args.decoder_sampler, low_res_noise=args.low_res_noise)
    out = Path(args.out or Path(args.pipeline) / "generated")
    record = generate_to_dir(
        args.pipeline,
        out,
        prompts=args.prompts,
        class_name=args.class_name,
        guidance=args.guidance,
        num=args.num,
        seed=args.seed,
        generator_options=generator,
        decoder_options=decoder,
    )
    return _print(out_dir=str(out), **record)


def cmd_invert(args) -> int:
    from .invert import invert_to_dir

    out = _output_dir(args, "inversion")
    info = invert_to_dir(
        args.checkpoint,
        out,
        images=args.images,
        num=args.num,
        steps=args.steps,
        spacing=args.spacing,
        batch_size=args.batch_size,
        use_ema=not args.no_ema,
        runtime=_runtime(args),
        data_dir=args.data_dir,
        class_name=args.class_name,
        guidance=args.guidance,
        prompt=args.prompt,
    )
    return _print(out_dir=str(out), **info)


def cmd_make_shards(args) -> int:
    from .shards import make_shards

    index = make_shards(args.folder, args.out, args.shard_size)
    summary = {k: index[k] for k in ("count", "channels")}
    return _print(out=str(args.out), shards=len(index["shards"]), **summary)


def cmd_import(args) -> int:
    from .convert import import_diffusers

    return _print(checkpoint=str(import_diffusers(args.folder, args.out)))


def cmd_eval_fid(args) -> int:
    from .evaluate import evaluate_fid

    path, result = evaluate_fid(
        args.source,
        dataset=args.dataset,
        split=args.split,
        extractor=args.extractor,
        num=args.num,
        sampling=_sample_options(args),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        inception_weights=args.inception_weights,
        out=args.out,
        progress=not args.no_progress,
    )
    if path is None:  # not the main process under torchrun
        return 0
    if "warning" in result:
        print(f"ddpm: warning: {result['warning']}", file=sys.stderr)
    return _print(out=str(path), **{k: v for k, v in result.items() if k != "sampling"})


def cmd_eval_nll(args) -> int:
    from .likelihood import evaluate_nll

    check_seed(args.seed)
    out = _output_dir(args, f"nll-{args.split}")
    summary = evaluate_nll(
        args.checkpoint,
        out,
        split=args.split,
        num_images=args.num,
        batch_size=args.batch_size,
        clip_denoised=not args.no_clip,
        estimate_steps=args.estimate_steps,
        seed=args.seed,
        use_ema=not args.no_ema,
        runtime=_runtime(args),
        data_dir=args.data_dir,
        progress=not args.no_progress,
        var_type=args.var_type,
        class_name=args.class_name,
        prompt=args.prompt,
    )
    return _print(out_dir=str(out), **summary)


def cmd_eval_text(args) -> int:
    from .text_metrics import evaluate_text

    path, result = evaluate_text(
        args.source,
        per_prompt=args.per_prompt,
        sampling=_sample_options(args),
        domain_clip=args.domain_clip,
        clip=args.clip_model,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        out=args.out,
        progress=not args.no_progress,
    )
    return _print(out=str(path), **{k: v for k, v in result.items() if k != "sampling"})


def cmd_train_classifier(args) -> int:
    from .metrics import classifier_path, save_classifier, train_classifier

    model, info = train_classifier(
        args.dataset, args.data_dir, args.image_size, args.epochs, progress=not args.no_progress
    )
    path = classifier_path(args.dataset, args.image_size, args.cache_dir)
    save_classifier(model, info, path)
    return _print(classifier=str(path), **info)


def cmd_figures(args) -> int:
    from .figures import make_figures

    check_seed(args.seed)
    out = _output_dir(args, "figures")
    info = make_figures(
        args.checkpoint,
        out,
        which=args.figure,
        seed=args.seed,
        num=args.num,
        frames=args.frames,
        use_ema=not args.no_ema,
        runtime=_runtime(args),
        data_dir=args.data_dir,
        class_name=args.class_name,
        guidance=args.guidance,
        prompt=args.prompt,
    )
    return _print(out_dir=str(out), **info)


def cmd_presets(args) -> int:
    from .presets import PRESETS, preset

    for name in PRESETS:
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        cfg = preset(name)
        print(f"{name:14s} {cfg.data.dataset:14s} {(doc[0] if doc else '')}")
    return 0


def cmd_config(args) -> int:
    from .config import validate
    from .presets import resolve_config

    cfg = resolve_config(None, args.preset, args.config, _config_values(args), args.set)
    validate(cfg)  # a starting point that `ddpm train` would refuse is no starting point
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``ddpm: error: ...`` and exit code 2, no usage block
    (``--help`` still shows it). The subcommands' parsers are of this class too."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
            line = f"ddpm: error: {message} (see `{self.prog} --help`)"
            # a value that is not valid UTF-8 is shown escaped (a terminal may not take it as it is)
            sys.stderr.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
        sys.exit(2)


def _refuse_invalid_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2, one line) a flag or positional argument whose value was not valid UTF-8 on the
    command line (Python holds such bytes as surrogate escapes): e.g. a path or a prompt in another
    encoding, which would fail later when written or printed."""
    from .conditions import check_text

    names, chosen, command = {}, [parser], parser
    while chosen:  # the parser, then the subcommand's parser (and its own subcommand's)
        command = chosen.pop()
        for action in command._actions:
            names.setdefault(action.dest, action.option_strings[0] if action.option_strings else action.dest)
            if isinstance(action, argparse._SubParsersAction):
                chosen.append(action.choices[getattr(args, action.dest)])
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list | tuple) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    check_text(text, names.get(dest, dest))
                except DDPMError as e:
                    command.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (Algorithm 1)")
    _add_training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-autoencoder",
        help="train latent diffusion's KL autoencoder (default preset fashion-mnist-autoencoder), then "
        "report its reconstruction error and domain FID on the test split",
    )
    _add_training_flags(p)
    p.set_defaults(func=lambda args: cmd_train(args, kind="autoencoder"))

    p = sub.add_parser("sample", help="sample from a checkpoint (Algorithm 2)")
    _add_checkpoint(p, "samples-out")
    p.add_argument(
        "--num",
        "--num-samples",  # torchrun's own parser takes a bare --num for its --numa-binding
        dest="num",
        type=positive,  # at most what memory holds (ddpm.sample)
        default=SAMPLE_DEFAULTS.num,
        help=f"number of samples (default {SAMPLE_DEFAULTS.num}; --num-samples under torchrun)",
    )
    _add_sampling_flags(p)
    _add(p, "--no-progress")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "pipeline", help="assemble a text-to-image pipeline folder from trained parts (nothing is retrained)"
    )
    p.add_argument("folder", help="the pipeline folder (pipeline.json is written there)")
    p.add_argument(
        "--generator", required=True, help="the run that makes the small images (text, class or none)"
    )
    p.add_argument(
        "--decoder",
        help="a super-resolution stage run (model.low_res), or for a latent diffusion generator an "
        "autoencoder (a train-autoencoder run or a diffusers AutoencoderKL folder; default: the "
        "generator's own copy, GENERATOR/autoencoder)",
    )
    p.add_argument(
        "--decoder-kind",
        choices=("super-resolution", "latent"),
        help="default: latent for a latent diffusion generator, else super-resolution",
    )
    p.add_argument(
        "--text-encoder",
        help="the text encoder folder (checked to be the one the generator was trained with; default: the "
        "generator's own copy)",
    )
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "generate", help="run a pipeline: prompt -> text encoder -> generator -> decoder -> images"
    )
    p.add_argument("pipeline", help="a pipeline folder (see `ddpm pipeline`)")
    p.add_argument("--out", help="output directory (default PIPELINE/generated)")
    p.add_argument("--num", type=positive, default=16, help="number of images (default 16)")
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt (repeatable: equal blocks, a grid row each; default one per class of the data)",
    )
    p.add_argument("--negative-prompt", help="guide away from this text (default: the empty text)")
    _add(p, "--class", "--guidance", "--seed", "--batch-size", *RUNTIME_FLAGS, "--no-progress")
    p.add_argument(
        "--guidance-interval",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only at timesteps LO..HI",
    )
    p.add_argument(
        "--sampler", choices=tuple(SAMPLERS), default="ddim", help="the generator's sampler (default ddim)"
    )
    p.add_argument("--steps", type=positive, default=50, help="the generator's sampling steps (default 50)")
    p.add_argument(
        "--decoder-sampler", choices=tuple(SAMPLERS), default="ddim", help="the decoder's (default ddim)"
    )
    p.add_argument(
        "--decoder-steps", type=positive, default=50, help="the decoder's sampling steps (default 50)"
    )
    p.add_argument(
        "--low-res-noise",
        type=int,
        metavar="LEVEL",
        help="the decoder's augmentation level (default its own)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("invert", help="DDIM inversion: images -> latents -> the same images (eta = 0)")
    _add_checkpoint(p, "inversion")
    p.add_argument("--images", help="samples.npz (or its folder) to invert (default: the run's test split)")
    p.add_argument("--num", type=image_count, default=8, help="how many images (default 8)")
    p.add_argument("--steps", type=positive, default=100, help="DDIM steps each way (default 100)")
    spacing = dict(
        default="linspace",
        help="timesteps (default linspace, the chain `ddpm sample --sampler ddim --steps N` uses)",
    )
    _add(p, "--spacing", "--batch-size", "--no-ema", *RUNTIME_FLAGS, "--data-dir", spacing=spacing)
    _add(p, "--class", "--prompt", "--guidance")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("make-shards", help="write an image folder as tar shards to stream in training")
    p.add_argument("folder", help="the image folder (every image below it)")
    p.add_argument("--out", required=True, help="directory for shard-NNNNNN.tar and shards.json")
    p.add_argument("--shard-size", type=positive, default=1000, help="images per shard (default 1000)")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("import", help="import a diffusers-format DDPM folder as a checkpoint")
    p.add_argument("folder", help="e.g. a local copy of google/ddpm-cifar10-32")
    p.add_argument("--out", required=True, help="run directory to create")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("eval", help="evaluate samples or a model")
    eval_sub = p.add_subparsers(dest="metric", required=True)
    e = eval_sub.add_parser("fid", help="FID, KID and Inception (or classifier) score vs a data split")
    e.add_argument(
        "source",
        help="samples.npz from `ddpm sample` (or its folder), or a run directory / checkpoint to sample from",
    )
    e.add_argument(
        "--dataset",
        help="reference dataset (default: the samples' own, from samples.json; else fashion-mnist)",
    )
    _add(e, "--split", split=dict(help="the reference split (default test)"))
    e.add_argument(
        "--extractor",
        choices=["auto", "inception", "domain"],
        default="auto",
        help="inception: the standard InceptionV3 (torch-fidelity); domain: a classifier trained on "
        "fashion-mnist/mnist; auto (default): domain for those two, inception otherwise",
    )
    e.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: download)",
    )
    _add(e, "--cache-dir")
    e.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=positive,
        help="with a checkpoint: samples to draw (default 50,000 for cifar10, else 10,000; "
        "--num-samples under torchrun)",
    )
    _add_sampling_flags(e)
    e.add_argument("--out", help="result JSON (default: next to the samples)")
    reference = dict(help="where the reference dataset is (default: the usual place)")
    _add(e, "--data-dir", "--no-progress", data_dir=reference)
    e.set_defaults(func=cmd_eval_fid)

    e = eval_sub.add_parser("nll", help="the NLL bound in bits/dim, per-t terms and rate/distortion")
    _add_checkpoint(e, "nll-SPLIT")
    _add(e, "--split")
    e.add_argument("--num", type=image_count, help="evaluate the first N images (default: the whole split)")
    _add(e, "--no-clip", no_clip=dict(help="do not clip x0 in the model mean (default: clip)"))
    e.add_argument(
        "--estimate-steps",
        type=positive,
        metavar="K",
        help="ESTIMATE from K evenly spaced timesteps instead of all T (labelled as such)",
    )
    nll_batch = dict(default=100)
    _add(e, "--batch-size", "--seed", "--no-ema", *RUNTIME_FLAGS, "--data-dir", batch_size=nll_batch)
    _add(e, "--var-type", "--no-progress")
    nll_class = "class-conditional runs: the bound on log p(x | class) over the split's images of this class"
    _add(
        e, "--class", class_name=dict(help=nll_class + " (default: the null class, the unconditional branch)")
    )
    _add(e, "--prompt", prompt=dict(help="text-conditional runs: the bound on log p(x | this text)"))
    e.set_defaults(func=cmd_eval_nll)

    e = eval_sub.add_parser(
        "text", help="prompt following: class agreement, attribute shift, domain CLIP and CLIP scores"
    )
    e.add_argument(
        "source",
        help="a text-conditional run directory / checkpoint or a pipeline folder to sample from (the "
        "sampling flags are its generator's), or a folder of their samples",
    )
    e.add_argument(
        "--per-prompt",
        type=positive,
        default=20,
        help="with a run: samples per prompt (default 20; the prompts: --prompt, else for each class "
        "'a photo of a CLASS' and its dark / light / small / large variants)",
    )
    e.add_argument(
        "--domain-clip",
        metavar="FOLDER",
        help="the domain CLIP pair to score with (default: the run's own text encoder, when it is one)",
    )
    e.add_argument(
        "--clip-model",
        metavar="PATH",
        help="a transformers CLIP model (local folder or hub name) for the standard CLIP score",
    )
    _add_sampling_flags(e)
    e.add_argument("--out", help="result JSON (default: text-eval.json beside the samples)")
    _add(e, "--cache-dir", "--data-dir", "--no-progress")
    e.set_defaults(func=cmd_eval_text)

    p = sub.add_parser("train-classifier", help="train (or retrain) the domain classifier used by eval fid")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--image-size", type=image_size, default=28)
    p.add_argument("--epochs", type=positive, default=2)
    _add(p, "--cache-dir")
    _add(p, "--data-dir", "--no-progress", data_dir=dict(help="where the dataset is"))
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser(
        "train-text-encoder",
        help="train the domain CLIP pair (text and image towers) on a dataset's captions (default preset "
        "fashion-mnist-text-encoder), then export it with its zero-shot accuracy into the run",
    )
    _add_training_flags(p)
    p.add_argument(
        "--tokenizer",
        choices=("bytes", "bpe"),
        help="bytes (the preset's): UTF-8 bytes; bpe: byte-level BPE trained on the captions (`tokenizers`)",
    )
    p.set_defaults(func=lambda args: cmd_train(args, kind="text-encoder"))

    p = sub.add_parser("figures", help="the paper's figures: forward process, progressive generation, ...")
    _add_checkpoint(p, "figures")
    p.add_argument(
        "--figure",
        action="append",
        help="forward, progressive, shared, interpolate or gif (repeatable; default all)",
    )
    p.add_argument("--num", type=figure_count, default=8, help="images per row (default 8)")
    p.add_argument("--frames", type=figure_count, default=10, help="columns along the chain (default 10)")
    _add(p, "--seed", "--no-ema", *RUNTIME_FLAGS, "--data-dir", "--class", "--prompt", "--guidance")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config as JSON (a starting point for --config)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _refuse_invalid_utf8(parser, args)  # before anything is read or written
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
        say(f"ddpm: error: {e}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
