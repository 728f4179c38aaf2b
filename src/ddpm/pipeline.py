"""The three-part text-to-image pipeline: a text encoder, a generator that makes a small image, and a
decoder that turns it into the full image, each trained on its own by its own command.

A pipeline is a folder with a ``pipeline.json`` that names its parts in order, by path (relative to the
folder, or absolute):

    {"format": "ddpm-pipeline",
     "parts": [{"role": "text-encoder", "path": "../text-encoder"},
               {"role": "generator", "path": "../fm-text-14"},
               {"role": "decoder", "kind": "super-resolution", "path": "../fm-sr"}]}

Swapping a decoder (or a generator with the encoder it was trained with) is an edit of that file. Loading
checks that the parts fit together and names the part that does not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .conditioning import Guidance
from .config import check_run_config
from .errors import ConfigError, DDPMError
from .files import read_json, write_json
from .images import to_uint8
from .sample import LoadedRun, LoadedRuns, SampleOptions

PIPELINE_FILE = "pipeline.json"
FORMAT = "ddpm-pipeline"
ROLES = ("text-encoder", "generator", "decoder")
DECODER_KINDS = ("super-resolution", "latent")


@dataclass
class Generated:
    images: torch.Tensor  # uint8 [N, C, H, W] at the decoder's size
    low_res: torch.Tensor | None  # a super-resolution pipeline's generator images (uint8, its size)
    labels: torch.Tensor | None  # each image's grid row (its prompt or class), where there are rows
    record: dict  # every part and setting


@dataclass
class Part:
    role: str
    path: Path
    kind: str | None = None  # decoders: super-resolution

    def describe(self) -> dict:
        return {"role": self.role, "path": str(self.path), **({"kind": self.kind} if self.kind else {})}


class Pipeline:
    """``Pipeline.load(folder)(prompts, guidance=w).images``: uint8 [N, C, H, W] at the decoder's size.

    Decoders: a super-resolution stage (a diffusion run with model.low_res that upsamples the generator's
    images), or a latent decoder (an autoencoder: a `ddpm train-autoencoder` run or a diffusers
    AutoencoderKL folder) that decodes a latent diffusion generator's latents in place of the one it was
    trained with, e.g. a decoder fine-tuned on the same latent space. ``generator`` is a checked run (its
    checkpoint); ``text_encoder`` is the part naming the encoder the generator was trained with."""

    def __init__(self, folder: Path, parts: list[Part]):
        self.folder, self.parts = folder, parts
        by_role = {p.role: p for p in parts}
        self.generator = _generator(by_role["generator"])
        self.decoder_part = by_role["decoder"]
        self.text_encoder = by_role.get("text-encoder")
        self.encoder = None  # the text encoder, loaded: the generator's sampling encodes with it
        self.runs = LoadedRuns()  # the generator and decoder, loaded once for every request
        if self.decoder_part.kind == "latent":
            self.decoder = self._check_latent_decoder()
        else:
            self.decoder = _checkpoint(self.decoder_part)
            self._check_super_resolution_decoder()
        if self.text_encoder is not None:
            self._check_text_encoder(self.generator.config.get("model", {}))

    @classmethod
    def load(cls, folder: str | Path) -> Pipeline:
        folder = Path(folder)
        spec_path = folder / PIPELINE_FILE
        if not spec_path.is_file():
            raise ConfigError(
                f"{folder} is not a pipeline (no {PIPELINE_FILE}); make one with `ddpm pipeline`"
            )
        try:
            spec = read_json(spec_path, error=ConfigError, expect=dict)
            if spec.get("format") != FORMAT:
                raise ValueError(f"format {spec.get('format')!r}, expected {FORMAT!r}")
            parts = [Part(p["role"], _resolve(folder, p["path"]), p.get("kind")) for p in spec["parts"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{spec_path} is damaged ({e})") from None
        return cls(folder, _checked_parts(parts, spec_path))

    @staticmethod
    def write(
        folder: str | Path,
        generator: str | Path,
        decoder: str | Path | None = None,
        text_encoder: str | Path | None = None,
        decoder_kind: str | None = None,
    ) -> Pipeline:
        """Assemble a pipeline folder from trained parts (paths kept relative to the folder when they can
        be), after checking that they fit together. ``decoder_kind``: super-resolution or latent (default:
        latent for a latent diffusion generator); ``decoder`` defaults to a latent generator's own copy of
        its autoencoder."""
        from .latent import RUN_COPY

        folder = Path(folder)
        g_checkpoint = _generator(Part("generator", Path(generator)))
        latent = bool(g_checkpoint.config["model"].get("autoencoder"))
        if decoder_kind is None:
            decoder_kind = "latent" if latent else "super-resolution"
        if decoder is None:
            if not (latent and (g_checkpoint.path.parent / RUN_COPY).is_dir()):
                raise ConfigError(
                    "a pipeline needs a last stage to make its images: name one (decoder); only a latent "
                    "generator brings its own",
                    field="decoder",
                )
            decoder = g_checkpoint.path.parent / RUN_COPY
        parts = [Part("generator", Path(generator)), Part("decoder", Path(decoder), decoder_kind)]
        if text_encoder is not None:
            parts.insert(0, Part("text-encoder", Path(text_encoder)))
        pipeline = Pipeline(folder, parts)  # checked before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        described = [{**p.describe(), "path": _relative(p.path, folder)} for p in parts]
        write_json(folder / PIPELINE_FILE, {"format": FORMAT, "parts": described})
        return pipeline

    def _check_super_resolution_decoder(self) -> None:
        g, d = self.generator.config, self.decoder.config
        g_data, d_model, d_data = g.get("data", {}), d.get("model", {}), d.get("data", {})
        g_model = g.get("model", {})
        if g_model.get("low_res"):
            raise ConfigError(f"pipeline generator {self.generator.path.parent} is a super-resolution stage")
        low_res = d_model.get("low_res", 0)
        if d_model.get("kind") == "text-encoder":
            raise ConfigError(
                f"pipeline decoder {self.decoder.path.parent} is a text encoder run, not a super-resolution "
                "stage: name it as text_encoder",
                field="text_encoder",
            )
        if not low_res:
            raise ConfigError(
                f"pipeline decoder {self.decoder.path.parent} is not a super-resolution stage (model.low_res)"
            )
        if low_res != g_data.get("image_size"):
            raise ConfigError(
                f"pipeline decoder {self.decoder.path.parent} upsamples {low_res}x{low_res} images; the "
                f"generator makes {g_data.get('image_size')}x{g_data.get('image_size')}"
            )
        if d_data.get("channels") != g_data.get("channels"):
            raise ConfigError(
                f"pipeline decoder {self.decoder.path.parent} takes {d_data.get('channels')}-channel images; "
                f"the generator makes {g_data.get('channels')}"
            )

    def _check_latent_decoder(self):
        """The autoencoder that decodes a latent generator's samples: same latent channels, and the
        generator's image size and channels out."""
        from .latent import load_autoencoder

        path = self.decoder_part.path
        g_model, g_data = self.generator.config.get("model", {}), self.generator.config.get("data", {})
        if not g_model.get("autoencoder"):
            raise ConfigError(
                f"pipeline decoder {path} is a latent decoder; the generator is not a latent run"
            )
        try:
            ae = load_autoencoder(path)
        except DDPMError as e:
            raise ConfigError(f"pipeline decoder {path}: {e}") from None
        if ae.latent_channels != g_model.get("latent_channels"):
            raise ConfigError(
                f"pipeline decoder {path} decodes {ae.latent_channels}-channel latents; the generator makes "
                f"{g_model.get('latent_channels')}-channel ones"
            )
        size = ae.factor * g_model.get("latent_size", 0)
        if size != g_data.get("image_size") or ae.channels != g_data.get("channels"):
            raise ConfigError(
                f"pipeline decoder {path} makes {ae.channels}x{size}x{size} images from the generator's "
                f"latents; the generator was trained on {g_data.get('channels')}x{g_data.get('image_size')}x"
                f"{g_data.get('image_size')}"
            )
        return ae

    def _check_text_encoder(self, g_model: dict) -> None:
        """The named encoder must be the one the generator was trained with: same width, same weights.
        Kept (``self.encoder``) for the generator's sampling where it is the encoder that would load."""
        from .clip import info_file
        from .encoders import RUN_COPY, load_text_encoder

        path = self.text_encoder.path
        if not g_model.get("context_dim"):
            raise ConfigError(f"pipeline text encoder {path}: the generator is not text-conditional")
        try:
            encoder = load_text_encoder(path)
        except DDPMError as e:
            raise ConfigError(f"pipeline text encoder {path}: {e}") from None
        trained = (g_model["context_dim"], g_model.get("pooled_dim") or g_model["context_dim"])
        if (encoder.width, encoder.pooled_width) != trained:
            raise ConfigError(
                f"pipeline text encoder {path} gives {encoder.width}-wide states and a {encoder.pooled_width}"
                f"-wide pooled text; the generator was trained on {trained[0]} and {trained[1]}"
            )
        own = self.generator.path.parent / RUN_COPY
        if info_file(own) is not None:
            if _weights_digest(own) != _weights_digest(path):
                raise ConfigError(
                    f"pipeline text encoder {path} is not the one the generator was trained with ({own})"
                )
        elif Path(g_model.get("text_encoder", "")) != path:
            raise ConfigError(
                f"pipeline text encoder {path} is not the one the generator was trained with "
                f"({g_model.get('text_encoder')})"
            )
        # Sampling encodes with the run's own copy, else with the encoder its config names (this one): the
        # encoder loaded here serves it where the two are the same files (a trained tower is the model's).
        if g_model.get("text_tower", "frozen") == "frozen" and (
            info_file(own) is None or _files_digest(own) == _files_digest(path)
        ):
            self.encoder = encoder

    def __call__(self, **request) -> Generated:
        """Run the pipeline; see ``prepare`` for the arguments."""
        return self.prepare(**request)()

    def prepare(
        self,
        prompts: list[str] | None = None,
        guidance: float | Guidance = 0.0,
        num: int = 16,
        seed: int = 0,
        generator_options: SampleOptions | None = None,
        decoder_options: SampleOptions | None = None,
        class_name: str | int | None = None,
    ):
        """Check a request against both stages (one-line errors, nothing drawn) and return the function
        that draws it: ``num`` images for ``prompts`` (equal blocks, in order; a text generator's
        default: one per class) or ``class_name`` (a class generator), and the record of every part and
        setting. ``*_options`` set each stage's sampler, steps, precision and so on. ``guidance``: the
        generator's w, or a whole Guidance (w, interval, rescale, negative prompt) in place of the
        generator options' own."""
        base = dataclasses.replace(
            generator_options or SampleOptions(sampler="ddim", steps=50, progress=False),
            num=num,
            seed=seed,
            prompts=tuple(prompts) if prompts else None,
            class_name=class_name,
        )
        if not isinstance(guidance, Guidance):
            guidance = dataclasses.replace(base.guidance_value, w=guidance)
        base = base.with_guidance(guidance)
        first = self.runs.load(self.generator, base).request(text_encoder=self.encoder)
        second_opts = dataclasses.replace(
            decoder_options or SampleOptions(sampler="ddim", steps=50, progress=False), num=num, seed=seed
        )
        if self.decoder_part.kind == "latent" and second_opts.low_res_noise is not None:
            raise ConfigError(
                "low_res_noise is a super-resolution decoder's; this pipeline's decoder is latent",
                field="low_res_noise",
            )
        second = None
        if self.decoder_part.kind != "latent":
            # Loaded once, on the generator's device, and checked but for its low-resolution images: they
            # are the generator's, whose size and channels the pipeline's checks matched to the decoder's.
            second = self.runs.load(self.decoder, second_opts, first.device, first.procs)
            second.check_before_low_res()
        return functools.partial(self._draw, first, second)

    def _draw(self, first, second: LoadedRun | None) -> Generated:
        start = time.time()
        if self.decoder_part.kind == "latent":  # the generator's latents, decoded by this pipeline's decoder
            first.autoencoder = self.decoder.to(first.device)
            images = to_uint8(first.draw())
            record = {
                "pipeline": str(self.folder),
                "parts": [p.describe() for p in self.parts],
                "generator": {**first.record(), "seconds": round(time.time() - start, 2)},
            }
            return Generated(images, None, first.labels, record)
        low = to_uint8(first.draw())
        middle = time.time()
        second = second.request(low_res=low)
        images = to_uint8(second.draw())
        record = {
            "pipeline": str(self.folder),
            "parts": [p.describe() for p in self.parts],
            "generator": {**first.record(), "seconds": round(middle - start, 2)},
            "decoder": {
                **second.record(),
                "low_res": "the generator's samples",
                "seconds": round(time.time() - middle, 2),
            },
        }
        return Generated(images, low, first.labels, record)


def generate_to_dir(pipeline: str | Path | Pipeline, out_dir: str | Path, **request) -> dict:
    """Run ``pipeline`` (``request``: Pipeline.__call__'s arguments) and write what `ddpm sample` writes
    (grid.png, images/, samples.npz) plus the generator's images as low-res-grid.png and generate.json,
    the record of every part and setting."""
    from .files import OutputFolder
    from .images import save_class_grid, save_grid, save_npz, save_pngs

    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline.load(pipeline)
    draw = pipeline.prepare(**request)  # bad requests fail here, before anything is written
    out = OutputFolder(out_dir, last="generate.json")
    try:
        made = draw()
        grids = {"grid.png": made.images, "low-res-grid.png": made.low_res}
        for name, images in grids.items():
            if images is not None and made.labels is None:
                save_grid(images, out.staging / name)
            elif images is not None:
                save_class_grid(images, made.labels, out.staging / name)
        save_pngs(made.images, out.staging / "images")
        class_ids = made.labels if "classes" in made.record["generator"] else None
        save_npz(made.images, out.staging / "samples.npz", class_ids)
        write_json(out.staging / "generate.json", made.record)
        out.publish()
    except BaseException:
        out.discard()
        raise
    return made.record


def _checked_parts(parts: list[Part], where) -> list[Part]:
    roles = [p.role for p in parts]
    for role in roles:
        if role not in ROLES:
            raise ConfigError(f"{where}: unknown part {role!r}; parts are {', '.join(ROLES)}")
    for role in ("generator", "decoder"):
        if roles.count(role) != 1:
            raise ConfigError(f"{where} must name one {role}")
    if roles.count("text-encoder") > 1:
        raise ConfigError(f"{where} names more than one text encoder")
    if [r for r in ROLES if r in roles] != roles:
        raise ConfigError(f"{where}: the parts must come in the order {' -> '.join(ROLES)}")
    for p in parts:
        if p.role == "decoder" and p.kind not in DECODER_KINDS:
            raise ConfigError(f"{where}: decoder kind must be {', '.join(DECODER_KINDS)}, got {p.kind!r}")
    return parts


def _checkpoint(part: Part) -> Checkpoint:
    try:
        ckpt = Checkpoint(part.path)
        check_run_config(ckpt.config, f"checkpoint {ckpt.path}")
        return ckpt
    except DDPMError as e:
        raise ConfigError(f"pipeline {part.role} {part.path}: {e}") from None


def _generator(part: Part) -> Checkpoint:
    """The generator's checkpoint: a diffusion run (not a text encoder or autoencoder run)."""
    from .clip import is_text_encoder

    text_encoder = is_text_encoder(part.path)  # a run of `ddpm train-text-encoder`, or its exported folder
    ckpt = None if text_encoder else _checkpoint(part)
    kind = "text-encoder" if text_encoder else ckpt.config["model"].get("kind")
    if kind == "text-encoder":
        raise ConfigError(
            f"pipeline generator {part.path} is a text encoder run (`ddpm train-text-encoder`), not a "
            "diffusion run: name it as text_encoder, and the run trained on it as the generator",
            field="text_encoder",
        )
    if kind == "autoencoder":
        raise ConfigError(f"pipeline generator {part.path} is an autoencoder, not a diffusion run")
    return ckpt


def _weights_digest(folder: Path) -> str:
    """Of a text encoder folder's weights (a train-text-encoder run also holds its checkpoint: not these)."""
    from .clip import MODEL_FILE

    path = Path(folder) / MODEL_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _files_digest(folder: Path) -> dict[str, str]:
    """Of each file of a text encoder folder, by name: two folders alike here load the same encoder."""
    from .clip import folder_files

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder_files(folder)}


def _resolve(folder: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(os.path.normpath(folder / p))


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), folder.resolve())
    except ValueError:  # another drive
        return str(path.resolve())
