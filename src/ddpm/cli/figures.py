"""`ddpm figures`: the paper's figures from a checkpoint."""

from __future__ import annotations

from .flags import RUNTIME_FLAGS, add_flags
from .options import output_dir, print_json, runtime


def add_figures(commands) -> None:
    p = commands.add_parser(
        "figures", help="the paper's figures: forward process, progressive generation, ..."
    )
    add_flags(p, "checkpoint", "--out:figures", "--figure", "--num:figures", "--frames", "--seed")
    add_flags(p, "--no-ema", *RUNTIME_FLAGS, "--data-dir", "--class", "--prompt", "--guidance", "--sampler")
    add_flags(p, "--no-progress")
    p.set_defaults(func=cmd_figures)


def cmd_figures(args) -> int:
    from ..config import check_seed
    from ..figures import make_figures

    check_seed(args.seed)
    out = output_dir(args, "figures")
    info = make_figures(
        args.checkpoint,
        out,
        which=args.figure,
        seed=args.seed,
        num=args.num,
        frames=args.frames,
        use_ema=not args.no_ema,
        runtime=runtime(args),
        data_dir=args.data_dir,
        class_name=args.class_name,
        guidance=args.guidance,
        prompt=args.prompt,
        sampler=args.sampler,
        progress=not args.no_progress,
    )
    return print_json(out_dir=str(out), **info)
