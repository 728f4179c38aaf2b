"""`ddpm serve`: a local web page that generates from a run or a pipeline (ddpm.serve)."""

from __future__ import annotations

from .flags import RUNTIME_FLAGS, add_flags
from .options import runtime


def add_serve(commands) -> None:
    p = commands.add_parser(
        "serve", help="a web page on 127.0.0.1 that generates from a run or a pipeline (needs the ui extra)"
    )
    add_flags(p, "source:serve", "--port", *RUNTIME_FLAGS)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..errors import ConfigError
    from ..serve import serve

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"port must be 1 to 65535, got {args.port}", field="port")
    print(f"ddpm: serving {args.source} on http://127.0.0.1:{args.port} (Ctrl-C stops)", flush=True)
    serve(args.source, args.port, runtime(args))
    return 0
