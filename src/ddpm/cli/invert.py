"""`ddpm invert`: DDIM inversion of images to latents and back."""

from __future__ import annotations

from .flags import RUNTIME_FLAGS, add_flags
from .options import output_dir, print_json, runtime


def add_invert(commands) -> None:
    p = commands.add_parser("invert", help="DDIM inversion: images -> latents -> the same images (eta = 0)")
    add_flags(p, "checkpoint", "--out:invert", "--images", "--num:invert", "--steps:invert")
    add_flags(p, "--spacing", "--batch-size", "--no-ema", *RUNTIME_FLAGS, "--data-dir")
    add_flags(p, "--class", "--prompt", "--guidance", "--no-progress")
    p.set_defaults(func=cmd_invert)


def cmd_invert(args) -> int:
    from ..invert import invert_to_dir

    out = output_dir(args, "inversion")
    info = invert_to_dir(
        args.checkpoint,
        out,
        images=args.images,
        num=args.num,
        steps=args.steps,
        spacing=args.spacing,
        batch_size=args.batch_size,
        use_ema=not args.no_ema,
        runtime=runtime(args),
        data_dir=args.data_dir,
        class_name=args.class_name,
        guidance=args.guidance,
        prompt=args.prompt,
        progress=not args.no_progress,
    )
    return print_json(out_dir=str(out), **info)
