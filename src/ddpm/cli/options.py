"""The parsed flags as the library's values (Runtime, SampleOptions, config keys, the output folder), and
the one JSON line a command prints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..runtime import Runtime
from ..sample import SampleOptions
from .flags import CONFIG_KEYS, SAMPLE_DEFAULTS


def runtime(args) -> Runtime:
    """The runtime flags (flags.RUNTIME_FLAGS) as one value."""
    return Runtime(args.device, args.precision, args.channels_last, args.compile, args.compile_mode)


def sample_options(args) -> SampleOptions:
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
        ema_width=args.ema_width,
        var_type=args.var_type,
        **dataclasses.asdict(runtime(args)),  # SampleOptions' fields of the same names
        progress=not args.no_progress,
        class_name=args.class_name,
        guidance=args.guidance,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        guidance_rescale=args.guidance_rescale,
        autoguidance=args.autoguidance,
        autoguide_from=args.autoguide_from,
        prompts=tuple(args.prompts) if args.prompts else None,
        negative_prompt=args.negative_prompt,
        low_res=args.low_res,
        low_res_noise=args.low_res_noise,
    )


def config_values(args) -> dict:
    """The shortcut flags as config keys (None for those not given)."""
    return {key: getattr(args, dest, None) for dest, key in CONFIG_KEYS.items()}


def output_dir(args, default_name: str) -> Path:
    """--out, or ``default_name`` inside the run directory of the checkpoint argument."""
    if args.out:
        return Path(args.out)
    source = Path(args.checkpoint)
    return (source if source.is_dir() else source.parent) / default_name


def print_json(**result) -> int:
    """Print ``result`` as one JSON line; 0, the command's exit code."""
    print(json.dumps(result))
    return 0
