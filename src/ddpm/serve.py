"""`ddpm serve`: a local web page that generates from a run or a text-to-image pipeline (gradio, the `ui`
extra). The page takes what the source is conditioned on (a prompt and a negative prompt, or a class),
the guidance, sampler, steps, seed and count, shows a progress bar while it samples, then a gallery and
the images (a zip) and samples.npz to download. Bad input is a message on the page. The source is loaded
once (``Studio``) and answers one request at a time (a queue): on a CPU, two at once would only halve
each one's speed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ConfigError, DDPMError, first_line
from .images import save_npz, save_pngs, to_uint8
from .samplers import ETA_DEFAULTS

MAX_COUNT = 64  # images per request: a page's gallery, and a bound on one request's time on a CPU
EVERY_CLASS = "every class"
RUNTIME_OPTIONS = (
    "device",
    "precision",
    "channels_last",
    "compile",
    "compile_mode",
)  # Runtime's fields  # the class choice that draws every class in equal blocks


@dataclasses.dataclass
class Request:
    """One page request, as typed. ``steps`` None (or 0): the sampler's default (all T for ancestral)."""

    prompt: str = ""
    negative_prompt: str = ""
    class_name: str = EVERY_CLASS
    guidance: float = 0.0
    sampler: str = "sde-dpm++3m"  # with eta 3 on 20 steps: the best FID at <= 50 evaluations measured
    steps: int | None = 20
    eta: float | None = None  # None: suggested_eta(sampler); ignored by the samplers without one
    seed: int = 0
    count: int = 8


class Studio:
    """A run (directory or checkpoint) or a pipeline folder, loaded once, drawing the page's requests."""

    def __init__(self, source: str | Path, runtime=None):
        from .checkpoint import Checkpoint
        from .config import Config
        from .pipeline import PIPELINE_FILE, Pipeline
        from .runtime import Runtime
        from .sample import LoadedRuns

        self.source, self.runtime = Path(source), runtime or Runtime()
        self.pipeline = self.checkpoint = self.encoder = None
        if (self.source / PIPELINE_FILE).is_file():
            self.pipeline = Pipeline.load(self.source)
            self.cfg = Config.from_dict(self.pipeline.generator.config)
        else:
            if not self.source.exists():
                raise ConfigError(f"{self.source} does not exist: give a run directory or a pipeline folder")
            self.checkpoint = Checkpoint(self.source)
            self.cfg = Config.from_dict(self.checkpoint.config)
            self.runs = LoadedRuns()
        model = self.cfg.model
        if model.kind != "unet" or model.low_res:
            what = "a super-resolution stage" if model.kind == "unet" else f"a {model.kind} run"
            raise ConfigError(f"{self.source} is {what}: serve a diffusion run or a pipeline")
        self.conditioning = (
            "text" if model.context_dim or self.cfg.data.labels == "captions" else
            "class" if model.num_classes else "none"
        )  # fmt: skip
        self.class_names = list(self.cfg.data.class_names) if self.conditioning == "class" else []
        if self.conditioning == "text" and self.pipeline is None and model.text_tower == "frozen":
            from .encoders import run_text_encoder

            self.encoder = run_text_encoder(self.cfg, self.checkpoint.path.parent)  # loaded once

    @property
    def title(self) -> str:
        return f"ddpm: {self.source.name} ({self.cfg.name})"

    def options(self, request: Request):
        """The request as SampleOptions (checked: one-line ConfigErrors)."""
        from .conditioning.guidance import Guidance
        from .sample import SampleOptions

        if not 1 <= request.count <= MAX_COUNT:
            raise ConfigError(f"count must be 1 to {MAX_COUNT}, got {request.count}", field="count")
        prompt = request.prompt.strip()
        if self.conditioning == "text" and not prompt:
            raise ConfigError("type a prompt: this model draws what a text describes", field="prompt")
        class_name = None
        if self.conditioning == "class" and request.class_name != EVERY_CLASS:
            class_name = request.class_name
        negative = request.negative_prompt.strip() or None
        guidance = Guidance(
            w=float(request.guidance), negative_prompt=negative if self.conditioning == "text" else None
        )
        opts = SampleOptions(
            num=request.count,
            batch_size=request.count,
            seed=int(request.seed),
            steps=int(request.steps) if request.steps else None,
            sampler=request.sampler,
            eta=self.eta(request),
            progress=True,  # the page's bar follows the sampler's (tqdm)
            class_name=class_name,
            prompts=(prompt,) if self.conditioning == "text" else None,
            **{name: getattr(self.runtime, name) for name in RUNTIME_OPTIONS},
        )
        return opts.with_guidance(guidance)

    @staticmethod
    def eta(request: Request) -> float | None:
        """The request's eta where its sampler has one (typed, else the suggested one)."""
        if request.sampler not in ETA_DEFAULTS:
            return None
        return suggested_eta(request.sampler) if request.eta is None else float(request.eta)

    def draw(self, request: Request):
        """uint8 images [N, C, H, W] for ``request``."""
        opts = self.options(request)
        if self.pipeline is not None:  # the decoder samples with the same sampler, steps and runtime
            from .sample import SampleOptions

            same = ("sampler", "steps", "eta", "progress", *RUNTIME_OPTIONS)
            decoder = SampleOptions(**{name: getattr(opts, name) for name in same})
            return self.pipeline(
                prompts=list(opts.prompts) if opts.prompts else None,
                guidance=opts.guidance_value,
                num=opts.num,
                seed=opts.seed,
                generator_options=opts,
                decoder_options=decoder,
                class_name=opts.class_name,
            ).images
        run = self.runs.load(self.checkpoint, opts)
        return to_uint8(run.request(text_encoder=self.encoder).draw())

    def write(self, images, folder: Path) -> list[Path]:
        """The images as PNGs, a zip of them and samples.npz in ``folder``; the PNGs' paths."""
        save_pngs(images, folder / "images")
        pngs = sorted((folder / "images").iterdir())
        with zipfile.ZipFile(folder / "images.zip", "w") as archive:
            for png in pngs:
                archive.write(png, png.name)
        save_npz(images, folder / "samples.npz")
        return pngs


def page(studio: Studio):
    """The gradio page of ``studio`` (a gradio Blocks, not yet launched)."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("ddpm serve needs gradio: pip install -e '.[ui]'")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network: no analytics, no update checks
    import gradio as gr

    from .samplers import SAMPLERS

    outputs = Path(tempfile.mkdtemp(prefix="ddpm-serve-"))

    def generate(
        prompt,
        negative,
        class_name,
        guidance,
        sampler,
        steps,
        eta,
        seed,
        count,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's way: a default it replaces)
    ):
        request = Request(prompt or "", negative or "", class_name or EVERY_CLASS, guidance or 0.0)
        try:
            request = dataclasses.replace(
                request, sampler=sampler, steps=_whole(steps, "steps"), seed=_whole(seed, "seed"),
                count=_whole(count, "count"), eta=None if eta in (None, "") else float(eta),
            )  # fmt: skip
            images = studio.draw(request)
            folder = Path(tempfile.mkdtemp(dir=outputs))
            pngs = studio.write(images, folder)
        except DDPMError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # the page shows one line; the console keeps the whole story
            import traceback

            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"internal error: {first_line(e)}", print_exception=False) from None
        return [str(p) for p in pngs], [str(folder / "images.zip"), str(folder / "samples.npz")]

    with gr.Blocks(title=studio.title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {studio.title}")
        text = studio.conditioning == "text"
        prompt = gr.Textbox(label="Prompt", visible=text, elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", visible=text, elem_id="negative")
        choices = [EVERY_CLASS, *studio.class_names]
        class_name = gr.Dropdown(choices, value=EVERY_CLASS, label="Class", visible=bool(studio.class_names))
        conditional = studio.conditioning != "none"
        with gr.Row():
            guidance = gr.Number(value=2.0 if conditional else 0.0, label="Guidance w", visible=conditional)
            sampler = gr.Dropdown(sorted(SAMPLERS), value=Request.sampler, label="Sampler")
            default = "(empty: the sampler's default)"
            steps = gr.Number(value=Request.steps, label=f"Steps {default}", elem_id="steps")
            suggested = suggested_eta(Request.sampler)
            eta = gr.Number(value=suggested, label="eta (empty: suggested)", elem_id="eta")
            seed = gr.Number(value=0, label="Seed", elem_id="seed")
            count = gr.Number(value=8, label=f"Count (1 to {MAX_COUNT})", elem_id="count")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Images", columns=8, elem_id="gallery")
        files = gr.File(label="Download", file_count="multiple", elem_id="files")
        inputs = [prompt, negative, class_name, guidance, sampler, steps, eta, seed, count]
        button.click(generate, inputs, [gallery, files], concurrency_limit=1)
        sampler.change(suggested_eta, sampler, eta)
    blocks.queue(default_concurrency_limit=1)
    return blocks


def suggested_eta(sampler: str) -> float | None:
    """The eta the page shows for ``sampler``: 3 for the SDE solvers (the best measured on Fashion-MNIST,
    docs/results.md), the default for DDIM and EDM, none for the samplers without one."""
    return 3.0 if sampler.startswith("sde-") else ETA_DEFAULTS.get(sampler)


def _whole(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    if float(value) != int(value):
        raise ConfigError(f"{name} must be a whole number, got {value}", field=name)
    return int(value)


def serve(source: str | Path, port: int = 7860, runtime=None, block: bool = True):
    """Load ``source`` and serve its page on http://127.0.0.1:PORT (until Ctrl-C when ``block``);
    returns the launched gradio Blocks (``.close()`` stops it)."""
    return launch(page(Studio(source, runtime)), port, block)


def launch(blocks, port: int, block: bool):
    import gradio as gr

    blocks.launch(
        server_name="127.0.0.1",
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=True,
        theme=gr.themes.Default(font=["sans-serif"], font_mono=["monospace"]),  # no web fonts to fetch
    )
    return blocks
