"""Every argument of the `ddpm` command, declared once: its type, default and help text.

A command takes an argument by its name (``"--seed"``). Where a flag has another meaning in some commands
(a default or a help text of its own: `--steps` is training steps, sampling steps, or DDIM steps each
way), the table names that meaning, and the command asks for it by that name (``"--steps:invert"``), so
that every difference between commands is written here and nowhere else (tests/test_cli.py checks it).

Two keywords are the table's own, not argparse's: ``also``, more option strings for the same flag, and
``config``, the config key that a training command's flag sets (``--lr`` is ``train.lr``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..config import AUTO_PRECISIONS, COMPILE_MODES, MAX_BATCH_SIZE, MAX_IMAGE_SIZE
from ..runtime import Runtime
from ..sample import SampleOptions
from ..samplers import SAMPLERS, SPACINGS

SAMPLE_DEFAULTS = SampleOptions()
RUNTIME_DEFAULTS = Runtime()

# ---- argument types: argparse refuses a bad count itself, naming the flag, in one line (the config's
# numbers are checked with the config, the sampling ones with the run: ddpm.sample, ddpm.conditioning) ----

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


@dataclass(frozen=True)
class Flag:
    """A flag with several meanings: ``usual``, what its bare name means (None: every command that takes
    it names a meaning), and ``meanings``, name -> the argparse keywords of each other one."""

    usual: dict | None
    meanings: dict[str, dict] = field(default_factory=dict)


def flag(usual: dict | None = None, **meanings: dict) -> Flag:
    return Flag(usual, meanings)


OUT = "output directory (default RUN_DIR/{})"  # the commands that write into the run they read
KEEP = " (default: the config's)"  # a training flag left unset leaves the config's value

# name -> argparse keywords, or a Flag where commands take the name in different senses
FLAGS: dict[str, dict | Flag] = {
    # ---- positional arguments ----
    "checkpoint": dict(help="a run directory or a checkpoint.safetensors file"),
    "pipeline": dict(help="a pipeline folder (see `ddpm pipeline`)"),
    "folder": flag(
        pipeline=dict(help="the pipeline folder (pipeline.json is written there)"),
        shards=dict(help="the image folder (every image below it)"),
        diffusers=dict(help="e.g. a local copy of google/ddpm-cifar10-32"),
    ),
    "source": flag(
        fid=dict(
            help="samples.npz from `ddpm sample` (or its folder), or a run directory / checkpoint to sample "
            "from"
        ),
        text=dict(
            help="a text-conditional run directory / checkpoint or a pipeline folder to sample from (the "
            "sampling flags are its generator's), or a folder of their samples"
        ),
        serve=dict(help="a run directory / checkpoint, or a pipeline folder (see `ddpm pipeline`)"),
    ),
    "--port": dict(type=int, default=7860, help="the page's port on 127.0.0.1 (default 7860)"),
    # ---- the config: presets, files, overrides and the shortcuts for config keys (training, `config`) ----
    "--preset": dict(help="start from a preset (see `ddpm presets`); default fashion-mnist"),
    "--config": dict(help="a JSON or TOML config file (may name its own preset)"),
    "--set": dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set model.dropout=0.1 (repeatable)",
    ),
    # (the shortcuts' ranges are the config's: ddpm.config.validate names the key; no defaults: an unset
    # flag leaves the config's value)
    "--dataset": flag(
        config=dict(
            help="fashion-mnist, mnist, cifar10, folder, shards, swiss-roll, s-curve or moons",
            config="data.dataset",
        ),
        fid=dict(help="reference dataset (default: the samples' own, from samples.json; else fashion-mnist)"),
        classifier=dict(default="fashion-mnist"),
    ),
    "--data-dir": flag(
        dict(help="where the dataset is (default: the run's, else the dataset's usual place)"),
        config=dict(help="data directory (image folder, or where the dataset files are)", config="data.root"),
    ),
    "--image-size": flag(
        config=dict(type=int, config="data.image_size"),
        classifier=dict(type=image_size, default=28),
    ),
    "--channels": dict(
        type=int, choices=(1, 3), help="1 or 3; default: the data's own", config="data.channels"
    ),
    "--steps": flag(
        dict(type=positive, help="sampling steps on a subset of timesteps (default: all T)"),
        config=dict(type=int, help="training steps", config="train.steps"),
        generate=dict(type=positive, default=50, help="the generator's sampling steps (default 50)"),
        invert=dict(type=positive, default=100, help="DDIM steps each way (default 100)"),
    ),
    "--batch-size": flag(
        dict(type=batch_size, default=64),
        config=dict(type=int, config="train.batch_size"),
        nll=dict(type=batch_size, default=100),
    ),
    "--lr": dict(type=float, config="train.lr"),
    "--seed": flag(
        dict(type=int, default=0),  # 0..2**63-1: checked by the commands (check_seed)
        config=dict(type=int, config="train.seed"),
    ),
    "--time-limit": dict(
        type=float, metavar="MINUTES", help="stop training after this long", config="train.time_limit_minutes"
    ),
    "--no-tensorboard": dict(
        action="store_const",
        const=False,
        default=None,
        help="write no TensorBoard event files (RUN/tensorboard; written where the package is installed)",
        config="train.tensorboard",
    ),
    "--budget": dict(
        type=float,
        metavar="MINUTES",
        help="train for this much training time: the step count is fixed from the speed of the first 25 "
        "steps (--steps is then not used) and the learning-rate schedule ends there",
        config="train.budget_minutes",
    ),
    "--tokenizer": dict(
        choices=("bytes", "bpe"),
        help="bytes (the preset's): UTF-8 bytes; bpe: byte-level BPE trained on the captions (`tokenizers`)",
        config="model.tokenizer",
    ),
    "--resume": dict(metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped"),
    # ---- where a command runs its network (ddpm.runtime.Runtime) ----
    "--device": flag(
        dict(default=RUNTIME_DEFAULTS.device, help="auto (default), cpu, cuda or cuda:N"),
        config=dict(default=None, help="auto, cpu, cuda or cuda:N" + KEEP, config="train.device"),
    ),
    "--precision": flag(
        dict(
            choices=AUTO_PRECISIONS,
            default=RUNTIME_DEFAULTS.precision,
            help="bf16 runs the network under autocast: faster on some machines, not bit-identical to fp32; "
            "bf16-norm also keeps GroupNorm in bf16 (no casts around it on CUDA); auto times the network's "
            "first call in fp32 and bf16 and runs in the faster (recorded) (default fp32)",
        ),
        config=dict(
            choices=AUTO_PRECISIONS,
            default=None,
            help="fp32, bf16 autocast, bf16-norm (GroupNorm in bf16 too), or auto (the faster of fp32 and "
            "bf16 on this machine, by a short probe)" + KEEP,
            config="train.precision",
        ),
    ),
    "--channels-last": dict(action="store_true", help="NHWC layout for the network (speed option)"),
    "--compile": dict(action="store_true", help="torch.compile the network (speed option)"),
    "--compile-mode": dict(
        choices=COMPILE_MODES,
        default=RUNTIME_DEFAULTS.compile_mode,
        help="torch.compile's mode with --compile: reduce-overhead replays CUDA graphs (default: default)",
    ),
    # ---- what a command writes, and how it reports ----
    "--out": flag(
        train=dict(help="run directory (default runs/PRESET)"),
        sample=dict(help=OUT.format("samples-out")),
        invert=dict(help=OUT.format("inversion")),
        nll=dict(help=OUT.format("nll-SPLIT")),
        figures=dict(help=OUT.format("figures")),
        generate=dict(help="output directory (default PIPELINE/generated)"),
        shards=dict(required=True, help="directory for shard-NNNNNN.tar and shards.json"),
        diffusers=dict(required=True, help="run directory to create"),
        export=dict(
            required=True, help="the diffusers folder to write (model_index.json, unet/, scheduler/)"
        ),
        fid=dict(help="result JSON (default: next to the samples)"),
        text=dict(help="result JSON (default: text-eval.json beside the samples)"),
    ),
    "--no-progress": dict(action="store_true", help="no progress bar"),
    "--cache-dir": dict(
        help="cache of the domain classifier / Inception reference statistics (default ~/.cache/ddpm)"
    ),
    # ---- how many ----
    "--num": flag(
        sample=dict(
            also=("--num-samples",),  # torchrun's own parser takes a bare --num for its --numa-binding
            type=positive,  # at most what memory holds (ddpm.sample)
            default=SAMPLE_DEFAULTS.num,
            help=f"number of samples (default {SAMPLE_DEFAULTS.num}; --num-samples under torchrun)",
        ),
        fid=dict(
            also=("--num-samples",),
            type=positive,
            help="with a checkpoint: samples to draw (default 50,000 for cifar10, else 10,000; "
            "--num-samples under torchrun)",
        ),
        generate=dict(type=positive, default=16, help="number of images (default 16)"),
        invert=dict(type=image_count, default=8, help="how many images (default 8)"),
        nll=dict(type=image_count, help="evaluate the first N images (default: the whole split)"),
        figures=dict(type=figure_count, default=8, help="images per row (default 8)"),
    ),
    # ---- sampling (ddpm.sample.SampleOptions) ----
    "--sampler": flag(
        dict(
            choices=tuple(SAMPLERS),
            default="ancestral",
            help="; ".join(f"{name}: {sampler.summary}" for name, sampler in SAMPLERS.items())
            + " (default ancestral)",
        ),
        generate=dict(choices=tuple(SAMPLERS), default="ddim", help="the generator's sampler (default ddim)"),
    ),
    "--eta": dict(
        type=float,  # bounds: the sampler's (ddpm.samplers.check_eta)
        help="noise level: DDIM's (0 deterministic, the default; 1 = ancestral fixed-small) or the SDE "
        "solvers' (1 the reverse SDE, the default; 0 the ODE; more adds noise) or edm's S_churn (default 10; "
        "0 the deterministic Heun sampler)",
    ),
    "--spacing": dict(
        choices=SPACINGS,
        help="which timesteps --steps keeps: linspace (0 and T-1 included; default for ancestral and ddim, "
        "and so for invert), leading, trailing, or logsnr (even in log-SNR; default for dpm++2m)",
    ),
    "--no-clip": dict(
        action="store_true",
        help="do not clip the predicted x0 to [-1, 1] in the model mean (2-D points are never clipped)",
    ),
    "--no-ema": dict(action="store_true", help="use the raw weights instead of the EMA"),
    "--ema-width": dict(
        type=float,
        metavar="SIGMA_REL",
        help="use the EMA of this width that the run kept (train.ema_widths) instead of its EMA",
    ),
    "--var-type": dict(
        choices=("fixedsmall", "fixedlarge"),
        help="use this fixed reverse variance instead of the checkpoint's",
    ),
    "--low-res": dict(
        metavar="SAMPLES",
        help="super-resolution stages: the low-resolution images to upsample (samples.npz or its folder, "
        "e.g. a base model's `ddpm sample` output; larger images are downsampled first)",
    ),
    "--low-res-noise": dict(
        type=int,  # bounds: the stage's timesteps (ddpm.sample)
        metavar="LEVEL",
        help="super-resolution stages (generate: the decoder): the augmentation noise level of the "
        "low-resolution input (0 = clean; default the stage's model.low_res_noise)",
    ),
    # ---- conditions and guidance (ddpm.conditioning) ----
    # the commands that draw many images take several classes or prompts; those that follow one chain
    # per image (invert, figures, eval nll) take one, and default to the unconditional branch
    "--class": flag(
        dict(
            dest="class_name",
            help="class-conditional runs: condition on this class (name or index; eval nll: over the "
            "split's images of it); default: the null class (the model's unconditional branch)",
        ),
        sampling=dict(
            dest="class_name",
            help="class-conditional runs: sample this class (name or index); default: every class in "
            "equal blocks, one grid row each",
        ),
    ),
    "--prompt": flag(
        dict(
            help="text-conditional runs: condition on this text (eval nll: the bound on log p(x | it)); "
            "default: the empty text (the unconditional branch)"
        ),
        sampling=dict(
            action="append",
            dest="prompts",
            help="text-conditional runs: a prompt (repeatable: the samples are split into equal blocks, a "
            "grid row per prompt; default 'a photo of a CLASS' for each class of the data)",
        ),
    ),
    "--negative-prompt": dict(
        help="text-conditional runs: guide away from this text (default: the empty text)"
    ),
    "--guidance": dict(
        type=float,  # bounds: ddpm.conditioning.guidance
        default=0.0,
        metavar="W",
        help="classifier-free guidance, Ho and Salimans' w: 0 (default) is plain conditional sampling",
    ),
    "--guidance-interval": dict(
        type=int,  # bounds: the run's timesteps (ddpm.sample)
        nargs=2,
        metavar=("LO", "HI"),
        help="guide only at model timesteps LO..HI (0-based; outside, the conditional model alone)",
    ),
    "--guidance-rescale": dict(type=float, default=0.0, help="CFG rescale (Lin et al. 2024), 0 (off) to 1"),
    "--autoguidance": dict(
        type=float,  # bounds: ddpm.conditioning.guidance
        default=0.0,
        metavar="W",
        help="autoguidance (Karras et al. 2024): (1 + W) * model - W * a weaker version of it "
        "(--autoguide-from); any run, with or without --guidance; 0 (default) is off",
    ),
    "--autoguide-from": dict(
        metavar="CHECKPOINT",
        help="autoguidance's weaker model: an earlier checkpoint of the same network (its EMA weights); "
        "default: the raw weights of the checkpoint sampled",
    ),
    # ---- one command's own ----
    "--shard-size": dict(type=positive, default=1000, help="images per shard (default 1000)"),  # make-shards
    "--generator": dict(  # pipeline
        required=True, help="the run that makes the small images (text, class or none)"
    ),
    "--decoder": dict(
        help="a super-resolution stage run (model.low_res), or for a latent diffusion generator an "
        "autoencoder (a train-autoencoder run or a diffusers AutoencoderKL folder; default: the "
        "generator's own copy, GENERATOR/autoencoder)",
    ),
    "--decoder-kind": dict(
        choices=("super-resolution", "latent"),
        help="default: latent for a latent diffusion generator, else super-resolution",
    ),
    "--text-encoder": dict(
        help="the text encoder folder (checked to be the one the generator was trained with; default: the "
        "generator's own copy)",
    ),
    "--decoder-sampler": dict(  # generate
        choices=tuple(SAMPLERS), default="ddim", help="the decoder's (default ddim)"
    ),
    "--decoder-steps": dict(type=positive, default=50, help="the decoder's sampling steps (default 50)"),
    "--decoder-eta": dict(type=float, help="the decoder's noise level (as --eta, for --decoder-sampler)"),
    "--images": dict(  # invert
        help="samples.npz (or its folder) to invert (default: the run's test split)"
    ),
    "--split": dict(  # eval fid (the reference images), eval nll
        default="test", choices=("train", "test"), help="the data split (default test)"
    ),
    "--extractor": dict(
        choices=["auto", "inception", "domain"],
        default="auto",
        help="inception: the standard InceptionV3 (torch-fidelity); domain: a classifier trained on "
        "fashion-mnist/mnist; auto (default): domain for those two, inception otherwise",
    ),
    "--inception-weights": dict(
        metavar="PATH",
        help="local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: download)",
    ),
    "--resamples": dict(  # eval fid
        type=integer(2, 10_000),
        default=50,
        help="bootstrap resamples behind the FID's standard error and 95%% interval (default 50; each costs "
        "one FID: milliseconds with the domain classifier, about a second with Inception)",
    ),
    "--estimate-steps": dict(
        type=positive,
        metavar="K",
        help="ESTIMATE from K evenly spaced timesteps instead of all T (labelled as such)",
    ),
    "--per-prompt": dict(  # eval text
        type=positive,
        default=20,
        help="with a run: samples per prompt (default 20; the prompts: --prompt, else for each class "
        "'a photo of a CLASS' and its dark / light / small / large variants)",
    ),
    "--domain-clip": dict(
        metavar="FOLDER",
        help="the domain CLIP pair to score with (default: the run's own text encoder, when it is one)",
    ),
    "--clip-model": dict(
        metavar="PATH",
        help="a transformers CLIP model (local folder or hub name) for the standard CLIP score",
    ),
    "--epochs": dict(type=positive, default=2),  # train-classifier
    "--figure": dict(  # figures
        action="append",
        help="forward, progressive, shared, interpolate or gif (repeatable; default all)",
    ),
    "--frames": dict(type=figure_count, default=10, help="columns along the chain (default 10)"),
}

# ---- the flags that commands take together ----

# Where and how a command runs its network (ddpm.runtime.Runtime): every command that runs one takes them all.
RUNTIME_FLAGS = ("--device", "--precision", "--channels-last", "--compile", "--compile-mode")
# `ddpm config` and the training commands
CONFIG_FLAGS = ("--preset", "--config", "--set", "--dataset:config", "--data-dir:config")
CONFIG_FLAGS += ("--image-size:config", "--channels", "--steps:config", "--batch-size:config", "--lr")
CONFIG_FLAGS += ("--seed:config", "--device:config", "--precision:config", "--time-limit", "--budget")
CONFIG_FLAGS += ("--no-tensorboard",)
# (the cache: for an autoencoder's report at its finish)
TRAINING_FLAGS = (*CONFIG_FLAGS, "--out:train", "--resume", "--no-progress", "--cache-dir")
# how to sample: `sample`, `eval fid` and `eval text`
SAMPLING_FLAGS = ("--steps", "--sampler", "--eta", "--no-clip", "--batch-size", "--seed")
SAMPLING_FLAGS += ("--spacing", "--no-ema", "--ema-width", *RUNTIME_FLAGS, "--var-type", "--class:sampling")
SAMPLING_FLAGS += ("--guidance",)
SAMPLING_FLAGS += ("--guidance-interval", "--guidance-rescale", "--prompt:sampling", "--negative-prompt")
SAMPLING_FLAGS += ("--low-res", "--low-res-noise", "--autoguidance", "--autoguide-from")


def keywords(spec: str) -> dict:
    """The table's argparse keywords for ``spec``: a name, or ``name:meaning``."""
    name, _, meaning = spec.partition(":")
    entry = FLAGS[name]
    if isinstance(entry, Flag):
        found = entry.meanings.get(meaning) if meaning else entry.usual
    else:
        found = None if meaning else entry
    if found is None:
        raise KeyError(f"the flag table has no {spec}")
    return dict(found)


def dest(spec: str) -> str:
    """Where argparse puts the value of ``spec``."""
    return keywords(spec).get("dest", spec.partition(":")[0].lstrip("-").replace("-", "_"))


def add_flags(parser: argparse.ArgumentParser, *specs: str) -> None:
    """Add the arguments ``specs`` (names, or ``name:meaning``) to ``parser`` as the table declares them."""
    for spec in specs:
        kw = keywords(spec)
        kw.pop("config", None)
        parser.add_argument(spec.partition(":")[0], *kw.pop("also", ()), **kw)


# The flags that are shortcuts for config keys: argparse dest -> config key, in the order they apply.
CONFIG_KEYS = {
    dest(spec): keywords(spec)["config"]
    for spec in (*CONFIG_FLAGS, "--tokenizer")
    if "config" in keywords(spec)
}

# The fields that the library's errors name (DDPMError.field) whose flag's dest has another name: the
# field -> the dest of the flag that sets it. Every other field is its flag's dest (guidance_rescale is
# --guidance-rescale). Config keys (train.lr) stay as they are: --set takes them so.
FIELD_DESTS = {"clip_denoised": "no_clip", "use_ema": "no_ema"}
# (the folder written: sample_to_dir's and generate_to_dir's out_dir, Trainer's and import_diffusers'
# run_dir; evaluate_nll's num_images)
FIELD_DESTS |= {"out_dir": "out", "run_dir": "out", "num_images": "num"}
