"""`ddpm train`, `ddpm train-autoencoder` and `ddpm train-text-encoder`: a config from the flags, then
the Trainer."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .flags import TRAINING_FLAGS, add_flags
from .options import config_values, print_json


def add_train(commands) -> None:
    p = commands.add_parser("train", help="train a model (Algorithm 1)")
    add_flags(p, *TRAINING_FLAGS)
    p.set_defaults(func=cmd_train)


def add_train_autoencoder(commands) -> None:
    p = commands.add_parser(
        "train-autoencoder",
        help="train latent diffusion's KL autoencoder (default preset fashion-mnist-autoencoder), then "
        "report its reconstruction error and domain FID on the test split",
    )
    add_flags(p, *TRAINING_FLAGS)
    p.set_defaults(func=lambda args: cmd_train(args, kind="autoencoder"))


def add_train_text_encoder(commands) -> None:
    p = commands.add_parser(
        "train-text-encoder",
        help="train the domain CLIP pair (text and image towers) on a dataset's captions (default preset "
        "fashion-mnist-text-encoder), then export it with its zero-shot accuracy into the run",
    )
    add_flags(p, *TRAINING_FLAGS, "--tokenizer")
    p.set_defaults(func=lambda args: cmd_train(args, kind="text-encoder"))


def cmd_train(args, kind: str | None = None) -> int:
    """`ddpm train`; with ``kind`` (train-autoencoder, train-text-encoder) the config must build that kind of
    model."""
    from ..checkpoint import CHECKPOINT_NAME, Checkpoint
    from ..config import Config
    from ..errors import ConfigError
    from ..presets import resolve_config
    from ..train import Trainer

    values = config_values(args)
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
    print_json(run_dir=str(run_dir), **result)
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        print(
            f"ddpm: stopped by {result['stopped']} at step {result['step']} with a checkpoint; "
            f"continue with: ddpm {args.command} --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + signal.Signals[result["stopped"]].value
    return 0
