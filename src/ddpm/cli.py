"""The `ddpm` command line (train, sample, invert, import, eval, figures, ...): parse and call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DDPMError

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
}


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
    p.add_argument("--dataset", help="fashion-mnist, mnist, cifar10, folder, swiss-roll, s-curve or moons")
    p.add_argument("--data-dir", help="data directory (image folder, or where the dataset files are)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int, help="1 or 3; default: the data's own")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="stop training after this long")


def resolve_config(args: argparse.Namespace, base=None):
    """Preset -> config file -> shortcut flags -> --set overrides, later ones winning."""
    from .config import load_file, parse_override, preset, set_value

    if base is not None:
        if args.preset or args.config:
            raise DDPMError("--resume uses the run's own config; give overrides with flags or --set only")
        cfg = base
    elif args.config:
        cfg = load_file(args.config, base=preset(args.preset) if args.preset else None)
    else:
        cfg = preset(args.preset or "fashion-mnist")
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_value(cfg, key, value)
    for text in args.set:
        set_value(cfg, *parse_override(text))
    return cfg


def cmd_train(args) -> int:
    from .checkpoint import CHECKPOINT_NAME, Checkpoint
    from .config import Config, validate
    from .train import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        base = Config.from_dict(Checkpoint(run_dir / CHECKPOINT_NAME).config)
        cfg = resolve_config(args, base)
    else:
        cfg = resolve_config(args)
        run_dir = Path(args.out or f"runs/{cfg.name}")
    validate(cfg)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    result = trainer.train()
    print(json.dumps({"run_dir": str(run_dir), **result}))
    return 0


def _output_dir(args, default_name: str) -> Path:
    """--out, or ``default_name`` inside the run directory of the checkpoint argument."""
    if args.out:
        return Path(args.out)
    source = Path(args.checkpoint)
    return (source if source.is_dir() else source.parent) / default_name


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How to sample: shared by `sample` and `eval fid CHECKPOINT`."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps on a subset of timesteps (default: all T)")
    p.add_argument(
        "--sampler",
        choices=["ancestral", "ddim", "dpm++2m"],
        default="ancestral",
        help="ancestral: the paper's Algorithm 2 (default); ddim: Song et al. 2021; "
        "dpm++2m: DPM-Solver++(2M), Lu et al. 2022, good in 10-25 steps",
    )
    p.add_argument(
        "--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 = ancestral fixed-small"
    )
    p.add_argument(
        "--spacing",
        choices=["linspace", "leading", "trailing", "logsnr"],
        help="which timesteps --steps keeps: linspace (0 and T-1 included; default for ancestral and ddim), "
        "leading, trailing, or logsnr (even in log-SNR; default for dpm++2m)",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument(
        "--no-clip",
        action="store_true",
        help="do not clip the predicted x0 to [-1, 1] (2-D points are never clipped)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 runs the network under autocast: faster, not bit-identical to fp32",
    )
    p.add_argument(
        "--var-type",
        choices=["fixedsmall", "fixedlarge"],
        help="use this fixed reverse variance instead of the checkpoint's",
    )
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for the network (speed option)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (speed option)")


def _sample(args, checkpoint, out: Path, num: int) -> dict:
    from .sample import sample_to_dir

    return sample_to_dir(
        checkpoint,
        out,
        num=num,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        use_ema=not args.no_ema,
        device=args.device,
        clip_denoised=False if args.no_clip else None,  # None: clip images, never points
        progress=not args.no_progress,
        precision=args.precision,
        var_type=args.var_type,
        sampler=args.sampler,
        eta=args.eta,
        spacing=args.spacing,
        channels_last=args.channels_last,
        compile=args.compile,
    )


def cmd_sample(args) -> int:
    out = _output_dir(args, "samples-out")
    info = _sample(args, args.checkpoint, out, args.num)
    print(json.dumps({"out_dir": str(out), **info}))
    return 0


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
        device=args.device,
        precision=args.precision,
        data_dir=args.data_dir,
    )
    print(json.dumps({"out_dir": str(out), **info}))
    return 0


def cmd_import(args) -> int:
    from .convert import import_diffusers

    path = import_diffusers(args.folder, args.out)
    print(json.dumps({"checkpoint": str(path)}))
    return 0


# Sample counts of the published FIDs (the paper: 50,000 for CIFAR-10); elsewhere 10,000.
FID_SAMPLES = {"cifar10": 50_000}


def cmd_eval_fid(args) -> int:
    from .checkpoint import CHECKPOINT_NAME, Checkpoint, atomic_write_text
    from .metrics import DOMAIN_DATASETS, evaluate_domain, load_samples

    source = Path(args.source)
    if not source.exists():
        raise DDPMError(f"{source} does not exist; give samples.npz, its folder, or a run directory")
    if source.suffix == ".safetensors" or (source / CHECKPOINT_NAME).is_file():
        # A checkpoint: sample first, with the published sample count by default.
        dataset = args.dataset or Checkpoint(source).config["data"]["dataset"]
        num = args.num if args.num is not None else FID_SAMPLES.get(dataset, 10_000)
        folder = (source if source.is_dir() else source.parent) / f"fid-samples-{num}"
        _sample(args, source, folder, num)
        source = folder
    folder = source if source.is_dir() else source.parent
    sampling = {}
    if (folder / "samples.json").is_file():  # how the samples were made: checkpoint, seed, steps, ...
        sampling = json.loads((folder / "samples.json").read_text())
    dataset = args.dataset or sampling.get("dataset", "fashion-mnist")
    samples = load_samples(source)
    extractor = args.extractor
    if extractor == "auto":
        extractor = "domain" if dataset in DOMAIN_DATASETS else "inception"
    progress = not args.no_progress
    if extractor == "domain":
        result = evaluate_domain(samples, dataset, args.split, args.data_dir, args.cache_dir, progress)
    else:
        from .inception import evaluate_inception
        from .train import resolve_device

        device = resolve_device(getattr(args, "device", "auto"))
        result = evaluate_inception(
            samples,
            dataset,
            args.split,
            args.data_dir,
            args.inception_weights,
            args.cache_dir,
            device,
            progress,
        )
    result = {"metric": "fid", "samples": str(folder), **result}
    recommended = FID_SAMPLES.get(dataset)
    if recommended and len(samples) < recommended:
        result["warning"] = (
            f"{len(samples)} samples; published {dataset} FIDs use {recommended} (FID is biased upward "
            "at smaller counts, so the numbers are not comparable)"
        )
        print(f"ddpm: warning: {result['warning']}", file=sys.stderr)
    if sampling:
        result["sampling"] = sampling
    out = Path(args.out) if args.out else folder / f"fid-{result['extractor']}-{args.split}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({"out": str(out), **{k: v for k, v in result.items() if k != "sampling"}}))
    return 0


def cmd_eval_nll(args) -> int:
    from .likelihood import evaluate_nll

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
        device=args.device,
        data_dir=args.data_dir,
        precision=args.precision,
        progress=not args.no_progress,
        var_type=args.var_type,
    )
    print(json.dumps({"out_dir": str(out), **summary}))
    return 0


def cmd_train_classifier(args) -> int:
    from .metrics import classifier_path, save_classifier, train_classifier

    model, info = train_classifier(
        args.dataset, args.data_dir, args.image_size, args.epochs, progress=not args.no_progress
    )
    path = classifier_path(args.dataset, args.image_size, args.cache_dir)
    save_classifier(model, info, path)
    print(json.dumps({"classifier": str(path), **info}))
    return 0


def cmd_figures(args) -> int:
    from .figures import make_figures

    out = _output_dir(args, "figures")
    info = make_figures(
        args.checkpoint,
        out,
        which=args.figure,
        seed=args.seed,
        num=args.num,
        frames=args.frames,
        use_ema=not args.no_ema,
        device=args.device,
        data_dir=args.data_dir,
    )
    print(json.dumps({"out_dir": str(out), **info}))
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS, preset

    for name in PRESETS:
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        cfg = preset(name)
        print(f"{name:14s} {cfg.data.dataset:14s} {(doc[0] if doc else '')}")
    return 0


def cmd_config(args) -> int:
    print(json.dumps(resolve_config(args).to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (Algorithm 1)")
    _add_config_flags(p)
    p.add_argument("--out", help="run directory (default runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from a checkpoint (Algorithm 2)")
    p.add_argument("checkpoint", help="a run directory or a checkpoint.safetensors file")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    _add_sampling_flags(p)
    p.add_argument("--out", help="output directory (default RUN_DIR/samples-out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("invert", help="DDIM inversion: images -> latents -> the same images (eta = 0)")
    p.add_argument("checkpoint", help="a run directory or a checkpoint.safetensors file")
    p.add_argument("--images", help="samples.npz (or its folder) to invert (default: the run's test split)")
    p.add_argument("--num", type=int, default=8, help="how many images (default 8)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps each way (default 100)")
    p.add_argument(
        "--spacing",
        choices=["linspace", "leading", "trailing", "logsnr"],
        default="linspace",
        help="timesteps (default linspace, the chain `ddpm sample --sampler ddim --steps N` uses)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--data-dir", help="where the dataset is (default: as in the run's config)")
    p.add_argument("--out", help="output directory (default RUN_DIR/inversion)")
    p.set_defaults(func=cmd_invert)

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
    e.add_argument(
        "--split", default="test", choices=["train", "test"], help="reference split (default test)"
    )
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
    e.add_argument("--data-dir", help="where the reference dataset is (default: the usual place)")
    e.add_argument(
        "--cache-dir",
        help="cache of the domain classifier / Inception reference statistics (default ~/.cache/ddpm)",
    )
    e.add_argument(
        "--num",
        type=int,
        help="with a checkpoint: samples to draw (default 50,000 for cifar10, else 10,000)",
    )
    _add_sampling_flags(e)
    e.add_argument("--out", help="result JSON (default: next to the samples)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval_fid)

    e = eval_sub.add_parser("nll", help="the NLL bound in bits/dim, per-t terms and rate/distortion")
    e.add_argument("checkpoint", help="a run directory or a checkpoint.safetensors file")
    e.add_argument("--split", default="test", choices=["train", "test"])
    e.add_argument("--num", type=int, help="evaluate the first N images (default: the whole split)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--no-clip", action="store_true", help="do not clip x0 in the model mean (default: clip)")
    e.add_argument(
        "--estimate-steps",
        type=int,
        metavar="K",
        help="ESTIMATE from K evenly spaced timesteps instead of all T (labelled as such)",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--data-dir", help="where the dataset is (default: as in the run's config)")
    e.add_argument(
        "--var-type",
        choices=["fixedsmall", "fixedlarge"],
        help="use this fixed reverse variance instead of the checkpoint's",
    )
    e.add_argument("--out", help="output directory (default RUN_DIR/nll-SPLIT)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval_nll)

    p = sub.add_parser("train-classifier", help="train (or retrain) the domain classifier used by eval fid")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("figures", help="the paper's figures: forward process, progressive generation, ...")
    p.add_argument("checkpoint", help="a run directory or a checkpoint.safetensors file")
    p.add_argument(
        "--figure",
        action="append",
        help="forward, progressive, shared, interpolate or gif (repeatable; default all)",
    )
    p.add_argument("--num", type=int, default=8, help="images per row (default 8)")
    p.add_argument("--frames", type=int, default=10, help="columns along the chain (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", help="where the dataset is (default: as in the run's config)")
    p.add_argument("--out", help="output directory (default RUN_DIR/figures)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config as JSON (a starting point for --config)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DDPMError as e:
        print(f"ddpm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out names an existing file, a full disk, no permission
        print(f"ddpm: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"ddpm: error: {e}; lower the learning rate or use --precision fp32", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ddpm: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
