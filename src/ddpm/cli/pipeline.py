"""`ddpm pipeline` and `ddpm generate`: assemble a text-to-image pipeline from trained parts, and run it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .flags import RUNTIME_FLAGS, add_flags
from .options import print_json, runtime


def add_pipeline(commands) -> None:
    p = commands.add_parser(
        "pipeline", help="assemble a text-to-image pipeline folder from trained parts (nothing is retrained)"
    )
    add_flags(p, "folder:pipeline", "--generator", "--decoder", "--decoder-kind", "--text-encoder")
    p.set_defaults(func=cmd_pipeline)


def add_generate(commands) -> None:
    p = commands.add_parser(
        "generate", help="run a pipeline: prompt -> text encoder -> generator -> decoder -> images"
    )
    add_flags(p, "pipeline", "--out:generate", "--num:generate", "--prompt:sampling")
    add_flags(p, "--negative-prompt", "--class", "--guidance", "--seed", "--batch-size")
    add_flags(p, *RUNTIME_FLAGS, "--no-progress", "--guidance-interval", "--guidance-rescale")
    add_flags(p, "--sampler:generate", "--eta", "--steps:generate")
    add_flags(p, "--decoder-sampler", "--decoder-steps", "--decoder-eta", "--low-res-noise")
    p.set_defaults(func=cmd_generate)


def cmd_pipeline(args) -> int:
    from ..pipeline import PIPELINE_FILE, Pipeline

    pipeline = Pipeline.write(args.folder, args.generator, args.decoder, args.text_encoder, args.decoder_kind)
    return print_json(
        pipeline=str(Path(args.folder) / PIPELINE_FILE), parts=[p.describe() for p in pipeline.parts]
    )


def cmd_generate(args) -> int:
    from ..conditioning import Guidance
    from ..pipeline import generate_to_dir
    from ..sample import SampleOptions

    def stage(steps, sampler, eta, **extra):  # one stage's sampling options
        return SampleOptions(
            steps=steps,
            sampler=sampler,
            eta=eta,
            batch_size=args.batch_size,
            **dataclasses.asdict(runtime(args)),  # SampleOptions' fields of the same names
            progress=not args.no_progress,
            **extra,
        )

    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    guidance = Guidance(args.guidance, interval, args.guidance_rescale, args.negative_prompt)
    generator = stage(args.steps, args.sampler, args.eta)
    decoder = stage(
        args.decoder_steps, args.decoder_sampler, args.decoder_eta, low_res_noise=args.low_res_noise
    )
    out = Path(args.out or Path(args.pipeline) / "generated")
    record = generate_to_dir(
        args.pipeline,
        out,
        prompts=args.prompts,
        class_name=args.class_name,
        guidance=guidance,
        num=args.num,
        seed=args.seed,
        generator_options=generator,
        decoder_options=decoder,
    )
    return print_json(out_dir=str(out), **record)
