"""One conditioner per run: it knows what the run's network is conditioned on (nothing, class ids or
text), owns the null condition (the null class id K, or the encoding of the empty text or of a
negative prompt), turns a request (a class, prompts) into each sample's condition, and builds the guided
network. Training uses it too: the rows condition dropout draws from, and the preview grids' conditions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from ..diffusion import VarType, parse_option
from ..errors import ConfigError
from .condition import ClassIds
from .guidance import Guidance, check_guidance, guided
from .requests import balanced_classes, check_text, class_index, grid_prompts, warn_cut_prompts

NULL_TEXT = ""  # what condition dropout trains in place of a caption: a text run's null condition


def make_conditioner(cfg, run_dir: str | Path = ".", text_encoder=None):
    """The conditioner of the run ``cfg`` describes (its directory ``run_dir`` holds its own copy of a
    text encoder; ``text_encoder``: one already loaded). Every conditioner answers
    ``for_samples(network, num, guidance, request, chain, device)`` (``chain``: the run's diffusion) with
    the network to sample (guided where it guides), each sample's row (or None), the conditions to feed
    and their record; and ``for_one(network, class id, w, prompt)`` with a plain ``(x, t)`` network."""
    if cfg.model.low_res:
        return LowResConditioner(cfg)
    if cfg.model.context_dim or cfg.data.labels == "captions":
        return TextConditioner(cfg, run_dir, text_encoder)
    if cfg.model.num_classes or cfg.data.labels == "classes":
        return ClassConditioner(cfg)
    return Unconditional(cfg)


def check_request(
    cfg, class_name: str | int | None, guidance: float = 0.0, prompt: str | None = None
) -> int | None:
    """The class id asked for (None: none), after checking that this run can take the request."""
    check_guidance(guidance)
    if prompt is not None:
        check_text(prompt, "prompt")
    if cfg.model.context_dim:
        if class_name is not None:
            raise ConfigError(
                "this model is text-conditional: give prompt, not class_name", field=("prompt", "class_name")
            )
        return None
    if prompt is not None:
        kind = "class-conditional: use class_name" if cfg.model.num_classes else "unconditional"
        raise ConfigError(
            f"prompt needs a text-conditional run; this one is {kind}", field=("prompt", "class_name")
        )
    if cfg.model.num_classes == 0 and (class_name is not None or guidance):
        _unconditional("class_name" if class_name is not None else "guidance")
    return None if class_name is None else class_index(cfg, class_name)


def _unconditional(field: str) -> NoReturn:
    raise ConfigError(f"this model is unconditional: {field} needs a conditional run", field=field)


def guided_network(
    network,
    cfg,
    guidance: float,
    interval: tuple[int, int] | None = None,
    rescale: float = 0.0,
    null=None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``network(x, t, cond)`` (a condition per example or one for all: ClassIds, or class ids as a
    tensor or one int; a text run's encodings) guided with scale w away from the null class. With a
    learned variance only the prediction's channels are guided (the variance is the conditional
    branch's). ``null``: the null condition (default the null class; a text run's is an encoding of ""
    or of a negative prompt)."""
    learned = parse_option(VarType, cfg.diffusion.var_type, "variance type").learned
    channels = cfg.data.channels if learned else None
    null = ClassIds.of(cfg.model.num_classes) if null is None else null

    def conditional(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return guided(network, cond, null, guidance, channels, interval, rescale)(x, t)

    return conditional


@dataclass(frozen=True)
class ConditionRequest:
    """What a user asks a run's samples to be conditioned on: a class (name or index; None: every class
    in equal blocks), prompts (equal blocks; None: one per class where the data has classes), or a
    super-resolution stage's low-resolution images (samples.npz or its folder, or uint8 [N, C, H, W])
    with their noise level (None: the stage's) and the seed of that noise."""

    class_name: str | int | None = None
    prompts: tuple[str, ...] | list[str] | None = None
    low_res: str | Path | torch.Tensor | None = None
    low_res_noise: int | None = None
    seed: int = 0


def _not_low_res(request: ConditionRequest) -> None:
    if request.low_res is not None or request.low_res_noise is not None:
        field = "low_res" if request.low_res is not None else "low_res_noise"
        raise ConfigError(
            f"{field}: low-resolution inputs need a super-resolution stage (model.low_res)", field=field
        )


def _not_text(cfg, prompts, guidance: Guidance) -> None:
    if prompts or guidance.negative_prompt is not None:
        kind = "class-conditional: use class_name" if cfg.model.num_classes else "unconditional"
        raise ConfigError(
            f"prompts and negative_prompt need a text-conditional run; this one is {kind}",
            field=("prompts", "negative_prompt", "class_name"),
        )


def with_condition(network, cond):
    """``network(x, t, cond)`` as the plain ``(x, t)`` callable the maths takes, for one fixed
    condition (a batch's class ids, encodings or low-resolution images)."""
    return functools.partial(_call_with, network, cond)


def _call_with(network, cond, x, t):
    return network(x, t, cond)


class Unconditional:
    def __init__(self, cfg):
        self.cfg = cfg

    def for_samples(self, network, num, guidance: Guidance, request=None, chain=None, device=None):
        request = request or ConditionRequest()
        _not_low_res(request)
        _not_text(self.cfg, request.prompts, guidance)
        if request.class_name is not None or guidance.w:
            _unconditional("class_name" if request.class_name is not None else "guidance")
        if guidance.options:
            raise ConfigError("this model is unconditional: guidance options need a conditional run")
        return network, None, None, {}

    def for_one(self, network, index, w: float = 0.0, prompt=None):
        return network


class ClassConditioner:
    """Class ids 0..K-1; the null class is id K (``cfg.model.num_classes``)."""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def null(self) -> int:
        return self.cfg.model.num_classes

    def for_samples(self, network, num, guidance: Guidance, request=None, chain=None, device=None):
        """The guided ``network(x, t, class_ids)``, each sample's class (``class_name``'s, or every class
        in equal blocks), the conditions to feed (the same ids, as ClassIds) and how they were chosen."""
        request = request or ConditionRequest()
        _not_low_res(request)
        _not_text(self.cfg, request.prompts, guidance)
        name = request.class_name
        index = None if name is None else class_index(self.cfg, name)
        if guidance.interval is not None:
            guidance.check_interval(chain.num_timesteps)
        conditional = self.guided(network, guidance)
        labels = balanced_classes(num, self.null) if index is None else torch.full((num,), index)
        info = {
            "classes": "balanced" if index is None else index,
            "class_names": list(self.cfg.data.class_names),
            **guidance.record(),
        }
        return conditional, labels, ClassIds(labels), info

    def guided(self, network, guidance: Guidance):
        return guided_network(network, self.cfg, guidance.w, guidance.interval, guidance.rescale)

    def for_one(self, network, index, w: float = 0.0, prompt=None):
        if index is None:
            if w:
                raise ConfigError(
                    "guidance needs class_name (the class to guide towards)", field=("guidance", "class_name")
                )
            return network
        conditional, ids = guided_network(network, self.cfg, w), ClassIds.of(index)
        return lambda x, t: conditional(x, t, ids)

    # training

    def for_training(self, dataset, device) -> TrainingConditions:
        """A class-conditional run's labels: as many classes as the data has (recorded in the run's
        config, which must not name others)."""
        cfg, names = self.cfg, dataset.class_names
        if cfg.data.class_names and tuple(cfg.data.class_names) != tuple(names):
            raise ConfigError(f"the data's classes {names} are not the run's {cfg.data.class_names}")
        if cfg.model.num_classes not in (0, len(names)):
            raise ConfigError(f"model.num_classes={cfg.model.num_classes}; the data has {len(names)}")
        cfg.model.num_classes, cfg.data.class_names = len(names), tuple(names)
        # a row is its class id: the network's condition wraps the batch's rows, copying nothing
        return TrainingConditions(dataset.labels, self.null, ClassIds, self._grid)

    def _grid(self, n: int):
        labels = balanced_classes(n, self.null)
        return labels, ClassIds(labels)


class TextConditioner:
    """Text encodings (or a trained tower's token ids) of prompts; the null condition is the encoding of
    the empty text, or of a negative prompt."""

    def __init__(self, cfg, run_dir: str | Path = ".", encoder=None):
        self.cfg, self.run_dir, self._encoder = cfg, Path(run_dir), encoder

    @property
    def encoder(self):
        """The run's text encoder: its own copy, else the one its config names (loaded once)."""
        if self._encoder is None:
            from ..encoders import run_text_encoder

            self._encoder = run_text_encoder(self.cfg, self.run_dir)
        return self._encoder

    def null(self, negative_prompt: str | None = None):
        return self.encoder.encode([negative_prompt or NULL_TEXT])

    def for_samples(self, network, num, guidance: Guidance, request=None, chain=None, device=None):
        """The guided ``network(x, t, encodings)``, each sample's prompt (equal blocks; default one per
        class where the data has classes), the prompts' encodings looked up per sample, and the record."""
        request = request or ConditionRequest()
        _not_low_res(request)
        if request.class_name is not None:
            message = "this model is text-conditional: give prompts, not class_name"
            raise ConfigError(message, field=("prompts", "class_name"))
        if guidance.interval is not None:
            guidance.check_interval(chain.num_timesteps)
        given = bool(request.prompts)
        prompts = list(request.prompts or grid_prompts(self.cfg))
        if not prompts:
            raise ConfigError("this model is text-conditional: give prompts", field="prompts")
        encoder, negative = self.encoder, guidance.negative_prompt
        cut = warn_cut_prompts(encoder, prompts)
        if negative:
            cut += warn_cut_prompts(encoder, [negative], "--negative-prompt")
        null = self.null(negative).to(device)
        conditional = guided_network(network, self.cfg, guidance.w, guidance.interval, guidance.rescale, null)
        labels = balanced_classes(num, len(prompts))
        info = {"prompts": prompts, "negative_prompt": negative, **guidance.record()}
        if cut:  # the record keeps the whole texts: say which the encoder saw only the start of
            from ..encoders import context_length

            info["prompts_cut_to_context"] = {"tokens": context_length(encoder), "prompts": cut}
        if not given and self.cfg.data.class_names:  # a prompt per class, in class order
            info = {"classes": "balanced", "class_names": list(self.cfg.data.class_names), **info}
        # each sample's encoding is looked up per batch: num copies of it could take terabytes
        return conditional, labels, PerSample(encoder.encode(prompts), labels), info

    def for_one(self, network, index, w: float = 0.0, prompt: str | None = None):
        null = self.null()
        if prompt is not None:
            warn_cut_prompts(self.encoder, [prompt])
        if prompt is None:
            if w:
                raise ConfigError(
                    "guidance needs prompt (the text to guide towards)", field=("guidance", "prompt")
                )
            return lambda x, t: network(x, t, null.to(x.device))
        text = self.encoder.encode([prompt])

        def prompted(x, t):
            conditional = guided_network(network, self.cfg, w, null=null.to(x.device))
            return conditional(x, t, text.to(x.device))

        return prompted

    # training

    def for_training(self, dataset, device) -> TrainingConditions:
        """Every distinct caption encoded once by the frozen encoder (or tokenized once when the run
        trains its text tower), the null text as the last row; a step looks its examples' rows up."""
        from ..encoders import CaptionCache

        cfg, encoder = self.cfg, self.encoder
        for name, size in (("context_dim", encoder.width), ("pooled_dim", encoder.pooled_width)):
            if getattr(cfg.model, name) not in (0, size):
                raise ConfigError(f"model.{name}={getattr(cfg.model, name)}; the text encoder gives {size}")
            setattr(cfg.model, name, size)
        self.cache = CaptionCache(encoder, dataset.captions, NULL_TEXT).to(device)
        if dataset.class_names:  # kept for the grids' prompts and for evaluation
            cfg.data.class_names = tuple(dataset.class_names)
        return TrainingConditions(self.cache.ids, self.cache.null, self.cache.rows, self._grid)

    def _grid(self, n: int):
        """A row per prompt: one per class where the data has classes, else its first captions."""
        prompts = grid_prompts(self.cfg, self.cache.texts)
        labels = balanced_classes(n, len(prompts))
        return labels, self.encoder.encode(prompts)[labels]

    def keep(self) -> None:
        """A copy of a domain text encoder in the run (RUN/text-encoder), so that the run alone can
        sample; copied aside and renamed into place. Pretrained encoders are recorded by name."""
        import shutil

        from ..clip import folder_files, info_file
        from ..encoders import RUN_COPY, DomainTextEncoder

        copy = self.run_dir / RUN_COPY
        if not isinstance(self.encoder, DomainTextEncoder) or info_file(copy) is not None:
            return
        aside = self.run_dir / f".{RUN_COPY}.tmp"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for path in folder_files(self.encoder.source["path"]):  # not a text encoder run's checkpoint
            shutil.copy2(path, aside / path.name)
        shutil.rmtree(copy, ignore_errors=True)
        aside.rename(copy)


class LowResConditioner:
    """A super-resolution stage: each sample is conditioned on a low-resolution image, upsampled and
    noised to a fixed level (noise-conditioning augmentation); no class, prompt or guidance."""

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self, request: ConditionRequest, guidance: Guidance, low_res_to_come: bool = False) -> None:
        """The request: no class or prompt, the low-resolution images (unless ``low_res_to_come``: a
        pipeline's generator has yet to draw them) and a noise level of the stage's schedule."""
        r = request
        if r.class_name is not None or r.prompts or guidance.negative_prompt is not None or guidance.w:
            raise ConfigError(
                "this run is a super-resolution stage: it takes low_res, not a class or prompt",
                field="low_res",
            )
        if r.low_res is None and not low_res_to_come:
            raise ConfigError(
                "this run is a super-resolution stage: give low_res, the images to upsample (samples.npz, "
                "its folder, or uint8 [N, C, H, W])",
                field="low_res",
            )
        T = self.cfg.diffusion.num_timesteps
        if r.low_res_noise is not None and not 0 <= r.low_res_noise <= T:
            level = r.low_res_noise
            raise ConfigError(
                f"low_res_noise: the low-resolution noise level must be in 0..{T}, got {level}",
                field="low_res_noise",
            )

    def for_one(self, network, index, w: float = 0.0, prompt=None):
        raise ConfigError(
            "this run is a super-resolution stage: invert, eval nll and figures take no low-resolution "
            "images to condition it on (sample it: `ddpm sample RUN --low-res SAMPLES`)"
        )

    def for_samples(self, network, num, guidance: Guidance, request=None, chain=None, device=None):
        """The first ``num`` low-resolution images, noised to the stage's level with the request's seed."""
        from ..images import load_samples
        from .low_res import conditions_for

        cfg, request = self.cfg, request or ConditionRequest()
        self.check(request, guidance)
        low_res = request.low_res
        images = low_res if isinstance(low_res, torch.Tensor) else load_samples(low_res)
        if len(images) < num:
            raise ConfigError(
                f"low_res holds {len(images)} images; {num} samples were asked for", field="low_res"
            )
        if images.shape[1] != cfg.data.channels:
            raise ConfigError(
                f"low_res images have {images.shape[1]} channels; the stage {cfg.data.channels}",
                field="low_res",
            )
        alphas = chain.np["alphas_cumprod"]
        cond = conditions_for(
            images[:num], cfg.model, cfg.data.image_size, alphas, request.seed, request.low_res_noise
        )
        source = "tensor" if isinstance(low_res, torch.Tensor) else str(low_res)
        info = {"low_res": source, "low_res_size": cfg.model.low_res, "low_res_noise": int(cond.level[0])}
        return network, None, cond, info


class TrainingConditions:
    """What a conditional run trains on: each example's row (``ids``), the null row condition dropout
    draws (``null``), the network's condition for rows (``inputs``) and a preview grid's labels and
    conditions (``grid(n)``)."""

    def __init__(self, ids: torch.Tensor, null: int, inputs: Callable, grid: Callable):
        self.ids, self.null, self.inputs, self.grid = ids, null, inputs, grid


class PerSample:
    """Each sample's condition as a row of ``table`` (e.g. the encodings of the prompts), looked up
    when a batch is drawn, so that only a batch's rows are ever copied out."""

    def __init__(self, table, rows: torch.Tensor):
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.table[self.rows[index]]
