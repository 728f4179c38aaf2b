"""`ddpm presets` and `ddpm config`: the named presets, and a resolved config printed as JSON."""

from __future__ import annotations

import json

from .flags import CONFIG_FLAGS, add_flags
from .options import config_values


def add_presets(commands) -> None:
    p = commands.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)


def add_config(commands) -> None:
    p = commands.add_parser(
        "config", help="print the resolved config as JSON (a starting point for --config)"
    )
    add_flags(p, *CONFIG_FLAGS)
    p.set_defaults(func=cmd_config)


def cmd_presets(args) -> int:
    from ..presets import PRESETS, preset

    for name in PRESETS:
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        cfg = preset(name)
        print(f"{name:14s} {cfg.data.dataset:14s} {(doc[0] if doc else '')}")
    return 0


def cmd_config(args) -> int:
    from ..config import validate
    from ..presets import resolve_config

    cfg = resolve_config(None, args.preset, args.config, config_values(args), args.set)
    validate(cfg)  # a starting point that `ddpm train` would refuse is no starting point
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
