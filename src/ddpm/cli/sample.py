"""`ddpm sample`: draw samples from a checkpoint (Algorithm 2, or another sampler)."""

from __future__ import annotations

from .flags import SAMPLING_FLAGS, add_flags
from .options import output_dir, print_json, sample_options


def add_sample(commands) -> None:
    p = commands.add_parser("sample", help="sample from a checkpoint (Algorithm 2)")
    add_flags(p, "checkpoint", "--out:sample", "--num:sample", *SAMPLING_FLAGS, "--no-progress")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from ..sample import sample_to_dir

    out = output_dir(args, "samples-out")
    info = sample_to_dir(args.checkpoint, out, sample_options(args))
    return 0 if info is None else print_json(out_dir=str(out), **info)  # None: not the main process
