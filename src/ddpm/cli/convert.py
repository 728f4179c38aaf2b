"""`ddpm make-shards`, `ddpm import` and `ddpm export`: an image folder as tar shards, a diffusers folder as a
run and a run as a diffusers folder."""

from __future__ import annotations

from .flags import add_flags
from .options import print_json


def add_make_shards(commands) -> None:
    p = commands.add_parser("make-shards", help="write an image folder as tar shards to stream in training")
    add_flags(p, "folder:shards", "--out:shards", "--shard-size", "--no-progress")
    p.set_defaults(func=cmd_make_shards)


def add_import(commands) -> None:
    p = commands.add_parser("import", help="import a diffusers-format DDPM folder as a checkpoint")
    add_flags(p, "folder:diffusers", "--out:diffusers")
    p.set_defaults(func=cmd_import)


def add_export(commands) -> None:
    p = commands.add_parser("export", help="write a run as a diffusers folder that DDPMPipeline loads")
    add_flags(p, "checkpoint", "--out:export", "--no-ema", "--ema-width")
    p.set_defaults(func=cmd_export)


def cmd_make_shards(args) -> int:
    from ..shards import make_shards

    index = make_shards(args.folder, args.out, args.shard_size, progress=not args.no_progress)
    summary = {k: index[k] for k in ("count", "channels")}
    return print_json(out=str(args.out), shards=len(index["shards"]), **summary)


def cmd_import(args) -> int:
    from ..convert import import_diffusers

    return print_json(checkpoint=str(import_diffusers(args.folder, args.out)))


def cmd_export(args) -> int:
    from ..convert import export_diffusers

    out = export_diffusers(args.checkpoint, args.out, use_ema=not args.no_ema, ema_width=args.ema_width)
    return print_json(out=str(out), pipeline="diffusers.DDPMPipeline")
