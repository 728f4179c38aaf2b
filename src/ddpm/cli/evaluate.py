"""`ddpm eval fid`, `eval nll` and `eval text`, and `ddpm train-classifier` (the domain classifier that
eval fid measures with)."""

from __future__ import annotations

import sys

from .flags import RUNTIME_FLAGS, SAMPLING_FLAGS, add_flags
from .options import output_dir, print_json, runtime, sample_options


def add_eval(commands) -> None:
    p = commands.add_parser("eval", help="evaluate samples or a model")
    metrics = p.add_subparsers(dest="metric", required=True)

    e = metrics.add_parser("fid", help="FID, KID and Inception (or classifier) score vs a data split")
    add_flags(e, "source:fid", "--dataset:fid", "--split", "--extractor", "--inception-weights")
    add_flags(e, "--resamples")
    add_flags(e, "--cache-dir", "--num:fid", *SAMPLING_FLAGS, "--out:fid", "--data-dir", "--no-progress")
    e.set_defaults(func=cmd_eval_fid)

    e = metrics.add_parser("nll", help="the NLL bound in bits/dim, per-t terms and rate/distortion")
    add_flags(e, "checkpoint", "--out:nll", "--split", "--num:nll", "--no-clip", "--estimate-steps")
    add_flags(e, "--batch-size:nll", "--seed", "--no-ema", *RUNTIME_FLAGS, "--data-dir", "--var-type")
    add_flags(e, "--no-progress", "--class", "--prompt")
    e.set_defaults(func=cmd_eval_nll)

    e = metrics.add_parser(
        "text", help="prompt following: class agreement, attribute shift, domain CLIP and CLIP scores"
    )
    add_flags(e, "source:text", "--per-prompt", "--domain-clip", "--clip-model", *SAMPLING_FLAGS)
    add_flags(e, "--out:text", "--cache-dir", "--data-dir", "--no-progress")
    e.set_defaults(func=cmd_eval_text)


def add_train_classifier(commands) -> None:
    p = commands.add_parser(
        "train-classifier", help="train (or retrain) the domain classifier used by eval fid"
    )
    add_flags(p, "--dataset:classifier", "--image-size:classifier", "--epochs", "--cache-dir")
    add_flags(p, "--data-dir", "--no-progress")
    p.set_defaults(func=cmd_train_classifier)


def cmd_eval_fid(args) -> int:
    from ..evaluate import evaluate_fid

    path, result = evaluate_fid(
        args.source,
        dataset=args.dataset,
        split=args.split,
        extractor=args.extractor,
        num=args.num,
        sampling=sample_options(args),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        inception_weights=args.inception_weights,
        out=args.out,
        progress=not args.no_progress,
        resamples=args.resamples,
    )
    if path is None:  # not the main process under torchrun
        return 0
    if "warning" in result:
        print(f"ddpm: warning: {result['warning']}", file=sys.stderr)
    return print_json(out=str(path), **{k: v for k, v in result.items() if k != "sampling"})


def cmd_eval_nll(args) -> int:
    from ..config import check_seed
    from ..likelihood import evaluate_nll

    check_seed(args.seed)
    out = output_dir(args, f"nll-{args.split}")
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
        runtime=runtime(args),
        data_dir=args.data_dir,
        progress=not args.no_progress,
        var_type=args.var_type,
        class_name=args.class_name,
        prompt=args.prompt,
    )
    return print_json(out_dir=str(out), **summary)


def cmd_eval_text(args) -> int:
    from ..text_metrics import evaluate_text

    path, result = evaluate_text(
        args.source,
        per_prompt=args.per_prompt,
        sampling=sample_options(args),
        domain_clip=args.domain_clip,
        clip=args.clip_model,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        out=args.out,
        progress=not args.no_progress,
    )
    return print_json(out=str(path), **{k: v for k, v in result.items() if k != "sampling"})


def cmd_train_classifier(args) -> int:
    from ..metrics import classifier_path, save_classifier, train_classifier

    model, info = train_classifier(
        args.dataset, args.data_dir, args.image_size, args.epochs, progress=not args.no_progress
    )
    path = classifier_path(args.dataset, args.image_size, args.cache_dir)
    save_classifier(model, info, path)
    return print_json(classifier=str(path), **info)
