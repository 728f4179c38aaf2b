"""Configuration: the dataclasses, config files (JSON or TOML), `section.field=value` overrides and
validation. The named presets, and resolving a run's config from them, are in ddpm.presets."""

from __future__ import annotations

import math
import operator
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from .errors import CheckpointError, ConfigError
from .files import check_tree, read_json, read_text

TEXT_TOWERS = ("frozen", "finetune", "scratch")  # model.text_tower
OPTIMIZERS = ("adam", "adamw")  # train.optimizer: Adam (weight decay added to the gradient) or AdamW
LR_SCHEDULES = ("constant", "cosine", "linear")  # train.lr_schedule, after the linear warm-up
LOSS_WEIGHTINGS = ("none", "min-snr")  # diffusion.loss_weighting
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")  # diffusion.timestep_sampling
MAX_EMA_WIDTH = 12**-0.5  # train.ema_width (EDM2's sigma_rel) below this: a power-function EMA exists
# the network's: fp32; bf16 autocast; bf16 autocast with GroupNorm in bf16 too (ddpm.runtime.wrap_network)
PRECISIONS = ("fp32", "bf16", "bf16-norm")
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's


# A precision may also be "auto": fp32 or bf16, whichever a short probe finds faster on the machine in use
# (bf16 only when at least 10% faster; ddpm.runtime.probe_precision): in training, of the run's own first
# step; in sampling, the likelihood, inversion and the figures, of the network's first call
AUTO_PRECISIONS = (*PRECISIONS, "auto")


def check_precision(precision: str, what: str = "precision", choices: tuple[str, ...] = PRECISIONS) -> None:
    if precision not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, got {precision!r}")


def check_compile_mode(mode: str, what: str = "compile mode") -> None:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"{what} must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


MAX_SEED = 2**63 - 1  # every random stream is derived from the seed (ddpm.rng); torch seeds are 64-bit


def check_seed(seed, what: str = "seed") -> None:
    """A seed is an integer in 0..2**63-1 (a negative one would fail deep inside numpy's seeding)."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # int, numpy integers
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{what} must be an integer in 0..2**63-1, got {seed!r}", field=what)


RUN_SECTIONS = ("model", "diffusion", "data")  # what a run's config must hold to be rebuilt


def check_run_config(config: dict, where) -> None:
    """A run's saved config (a checkpoint's) must have its model, diffusion and data sections: filling
    a missing one with defaults would rebuild another model and refuse it for a misleading reason."""
    missing = [name for name in RUN_SECTIONS if not isinstance(config.get(name), dict)]
    if missing:
        raise CheckpointError(
            f"{where}: its config is incomplete (no {' or '.join(missing)} section), so the model cannot "
            "be rebuilt"
        )


class ModelConfig:
    """The model section: one dataclass per ``model.kind``, holding that kind's fields alone.

    ``ModelConfig(kind=..., **fields)`` makes the kind's section (``UNetConfig`` by default), so the
    section a config holds always matches its kind. A model of another kind than the U-Net conditions on
    nothing and works in pixel space: it answers the U-Net's conditioning fields with "none" (read-only),
    so that code asking ``cfg.model.num_classes`` need not first ask the kind."""

    def __new__(cls, *args, **kwargs):
        if cls is ModelConfig:
            cls = model_section(kwargs.get("kind", "unet"))
        return object.__new__(cls)

    def __post_init__(self):
        if self.kind != type(self).kind:
            raise ConfigError(
                f"a {type(self).__name__}'s model.kind is {type(self).kind!r}, got {self.kind!r}"
            )

    def __setattr__(self, name: str, value) -> None:
        # a field of another kind would otherwise become a silent instance attribute
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"the {type(self).kind} model has no field {name!r}")
        if name == "kind" and value != type(self).kind:  # another kind is another section
            raise AttributeError("change a model's kind with with_kind() or set_value(cfg, 'model.kind', K)")
        object.__setattr__(self, name, value)

    num_classes = property(lambda self: 0)
    context_dim = property(lambda self: 0)
    text_encoder = property(lambda self: "")
    text_tower = property(lambda self: "frozen")
    low_res = property(lambda self: 0)
    autoencoder = property(lambda self: "")
    latent_size = property(lambda self: 0)


@dataclass
class UNetConfig(ModelConfig):
    """The paper's noise-predicting U-Net, for images; or for a latent diffusion run, the autoencoder's
    latents; with classes, text or a low-resolution image as its condition."""

    kind: str = "unet"
    # latent diffusion: the autoencoder whose latents it models (a `ddpm train-autoencoder` run or a
    # diffusers AutoencoderKL folder); latent_channels and latent_size are set from it
    latent_channels: int = 4
    autoencoder: str = ""
    latent_size: int = 0
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32
    num_classes: int = 0  # > 0: class-conditional (set from the data when data.labels=classes)
    # data.labels=captions: a `ddpm train-text-encoder` folder, or a transformers CLIP / T5 model
    text_encoder: str = ""
    context_dim: int = 0  # > 0: text-conditional (set from the text encoder's width)
    pooled_dim: int = 0  # the size of the encoder's pooled text (set from it; 0: context_dim's)
    # frozen: the text encoder is fixed; finetune / scratch: a domain encoder's text tower is trained with
    # the denoiser (GLIDE), starting from its weights / from random ones
    text_tower: str = "frozen"
    # > 0: a super-resolution stage of a cascade, conditioned on the image at this size (upsampled to
    # data.image_size) noised to a random augmentation level in 0..low_res_noise_max - 1 during training
    # and to low_res_noise at sampling (level s noises like x_{s-1} of the schedule; 0 is clean)
    low_res: int = 0
    low_res_noise_max: int = 250
    low_res_noise: int = 50


@dataclass
class MLPConfig(ModelConfig):
    """A small MLP denoiser for 2-D points."""

    kind: str = "mlp"
    mlp_hidden: int = 128
    mlp_layers: int = 3


@dataclass
class AutoencoderConfig(ModelConfig):
    """Latent diffusion's first stage (Rombach et al.'s KL-regularised autoencoder): its latent channels,
    KL weight and the levels of its encoder and decoder."""

    kind: str = "autoencoder"
    latent_channels: int = 4
    kl_weight: float = 1e-6
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    num_groups: int = 32


@dataclass
class TextEncoderConfig(ModelConfig):
    """The domain CLIP pair (`ddpm train-text-encoder`): the text tower (a causal transformer over "bytes"
    or a "bpe" tokenizer trained on the captions), the image tower's width and the shared embedding size."""

    kind: str = "text-encoder"
    tokenizer: str = "bytes"
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_max_length: int = 77  # tokens, with the start and end tokens
    image_width: int = 32
    embed_dim: int = 128


MODEL_SECTIONS = {c.kind: c for c in (UNetConfig, MLPConfig, AutoencoderConfig, TextEncoderConfig)}
MODEL_KINDS = tuple(MODEL_SECTIONS)


def model_section(kind: str) -> type[ModelConfig]:
    """The model section's dataclass for ``kind``."""
    if kind not in MODEL_SECTIONS:
        raise ConfigError(f"model.kind must be {', '.join(MODEL_KINDS)}, got {kind!r}")
    return MODEL_SECTIONS[kind]


def with_kind(model: ModelConfig, kind: str) -> ModelConfig:
    """The section of ``kind`` that keeps the fields ``model`` shares with it (``--set model.kind=...``
    after a preset of another kind keeps, e.g., the preset's ch and ch_mult as the flat section did)."""
    section = model_section(kind)
    shared = {f.name for f in fields(section)} & set(vars(model)) - {"kind"}
    return section(kind=kind, **{name: getattr(model, name) for name in shared})


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: str = "eps"
    var_type: str = "fixedlarge"
    loss_type: str = "mse"
    hybrid_lambda: float = 0.001
    # L_simple's weight per timestep: "none" (the paper's: every t alike) or "min-snr" (Hang et al. 2023:
    # the loss on x0 weighted by min(SNR(t), gamma), i.e. eps's by min(SNR, gamma) / SNR)
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # How training draws t: "uniform" (Algorithm 1) or "lognormal" (EDM, Karras et al. 2022: ln sigma_t ~
    # N(mean, std), sigma_t = sqrt((1 - abar_t) / abar_t), taken to the nearest timestep of the chain)
    timestep_sampling: str = "uniform"
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    # mean_type "edm": the data's standard deviation in EDM's preconditioning (Karras et al. 2022, Table 1)
    sigma_data: float = 0.5


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | cifar10 | folder | shards | 2-D toys
    root: str | None = None  # data directory; None = the dataset's usual place
    image_size: int = 28
    channels: int | None = None  # None = the data's own (1 for grayscale, 3 for colour)
    random_flip: bool = True
    num_points: int = 10000  # 2-D toys only
    split: str = "train"
    # "classes": the dataset's class labels (an image folder: one sub-folder per class); "captions": a
    # caption per image (made from the class and the pixels; an image folder: metadata.jsonl or .txt files)
    labels: str = "none"
    # Made captions: the share of images whose caption leaves out its attribute words (drawn per image
    # from the captions' seed), so that a prompt without them ("a photo of a coat") asks for any coat. At 0
    # such a caption belongs only to the middle thirds, whose real images score domain FID 13.81 against
    # Fashion-MNIST's test split (bench/caption_floor.py); the class's own images score 0.90
    caption_attribute_dropout: float = 0.0
    class_names: tuple[str, ...] = ()  # of a class-conditional run, recorded from the data
    loader_workers: int = 0  # processes decoding streamed shards (dataset "shards"); 0 = in the trainer


@dataclass
class TrainConfig:
    steps: int = 800_000
    batch_size: int = 128  # the global batch, split over the processes under torchrun
    grad_accum: int = 1  # micro-batches per step and process (gradients accumulated, one update)
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # the global gradient norm's limit; 0 = no clipping
    ema_decay: float = 0.9999
    # EDM2's power-function EMA (Karras et al. 2024) of this relative width sigma_rel (e.g. 0.05 to 0.1) in
    # place of the constant train.ema_decay: its length is a share of the run, whatever the run's length
    ema_width: float | None = None
    # More power-function EMAs kept beside it, one per width (each in the checkpoint): the width to sample
    # is then chosen after training, by measured FID (SampleOptions.ema_width, `--ema-width`)
    ema_widths: tuple[float, ...] = ()
    cond_dropout: float = 0.1  # class-conditional runs: the share of examples trained as the null class
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to 0 at train.steps), after the warm-up
    seed: int = 0
    on_nonfinite: str = "stop"  # a NaN / inf loss or gradient: "stop", or "skip" the update
    # fp32 | bf16 (autocast) | bf16-norm (autocast, GroupNorm in bf16 too) | auto (the faster of fp32 and
    # bf16 on this machine, probed at the start and recorded)
    precision: str = "fp32"
    channels_last: bool = False  # NHWC memory layout for the network (a speed option)
    compile: bool = False  # torch.compile the network (a speed option; slow first steps)
    # torch.compile's mode: "default", "reduce-overhead" (CUDA graphs: launches stop costing CPU time),
    # "max-autotune" (also searches kernels; slow to compile), "max-autotune-no-cudagraphs"
    compile_mode: str = "default"
    fused_optimizer: bool = False  # Adam / AdamW's fused kernel (a speed option on GPUs; same maths)
    # read the loss and gradient norm back at log and checkpoint steps only, so that the host can run
    # ahead of the GPU between them: a non-finite step is skipped on the device (fused Adam's found_inf) and
    # on_nonfinite is applied when it is read (a speed option on GPUs; needs fused_optimizer)
    deferred_checks: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    time_limit_minutes: float | None = None  # stop (and checkpoint) after this much training time
    # train for this much training time: the step count is fixed from the speed of the first steps, and
    # train.steps is not used (ddpm.budget)
    budget_minutes: float | None = None
    log_every: int = 100
    tensorboard: bool = True  # event files in RUN/tensorboard where the package is installed (ddpm.dashboard)
    checkpoint_every: int = 5000
    sample_every: int = 10000
    num_sample_images: int = 64
    sample_steps: int | None = None  # respaced ancestral steps for sample grids; None = all T


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        apply_dict(cfg, d)
        return cfg


# ---- files and overrides ----


def _coerce(value, hint, where: str):
    """Convert a JSON/TOML value or a command-line string to the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} expects {hint.__name__}, got {value!r}") from None
    return value


def _field_types(obj) -> dict:
    return typing.get_type_hints(type(obj))


def set_value(cfg: Config, dotted: str, value) -> None:
    """Set e.g. ``train.lr`` from a string or a parsed value, with type checking."""
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] == "name":
        cfg.name = str(value)
        return
    if len(parts) != 2 or parts[0] not in ("model", "diffusion", "data", "train"):
        raise ConfigError(
            f"unknown config key {dotted!r}; use section.field with section in model/diffusion/data/train"
        )
    if dotted == "model.kind":
        cfg.model = with_kind(cfg.model, _coerce(value, str, dotted))
        return
    section = getattr(cfg, parts[0])
    hints = _field_types(section)
    if parts[1] not in hints:
        owners = [kind for kind, c in MODEL_SECTIONS.items() if parts[1] in c.__dataclass_fields__]
        if parts[0] == "model" and owners:
            raise ConfigError(
                f"{dotted} is a field of the {' and '.join(owners)} model, and this config's model.kind is "
                f"{cfg.model.kind}; fields of its model: {', '.join(hints)}"
            )
        raise ConfigError(f"unknown config key {dotted!r}; fields of {parts[0]}: {', '.join(hints)}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))


def apply_dict(cfg: Config, d: dict) -> None:
    """Set every value of ``d`` (sections of fields, as a config file or a checkpoint holds them).

    The model section's kind applies first. Its fields that belong to another kind are left out: configs
    written before the model section was split per kind hold every kind's fields (an MLP run's dropout,
    a U-Net's tokenizer), which never did anything."""
    for key, value in d.items():
        if not isinstance(value, dict):
            set_value(cfg, key, value)
            continue
        if key == "model":
            if "kind" in value:
                set_value(cfg, "model.kind", value["kind"])
            others = {name for c in MODEL_SECTIONS.values() for name in c.__dataclass_fields__}
            others -= set(cfg.model.__dataclass_fields__)
            value = {sub: v for sub, v in value.items() if sub != "kind" and sub not in others}
        for sub, v in value.items():
            set_value(cfg, f"{key}.{sub}", v)


def read_config_file(path: str | Path) -> dict:
    """A JSON or TOML config file's mapping of sections as written, with its ``preset`` key if it has one
    (ddpm.presets.load_file starts it from that preset)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix != ".toml":
        d = read_json(path, "config file", error=ConfigError)
    else:
        text = read_text(path, "config file", error=ConfigError)  # at most MAX_JSON_BYTES, UTF-8
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from None
        except RecursionError:
            raise ConfigError(f"cannot parse config file {path}: nested more than Python can read") from None
        check_tree(d, f"config file {path}", ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return dict(d)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _section_name(cfg: Config, section) -> str:
    return next(name for name in ("model", "diffusion", "data", "train") if getattr(cfg, name) is section)


# Bounds past which a value could only fail later (an allocation no machine has, an int64 overflow):
# refused up front, with the field's name. Every other number is >= 0 and fits an int64.
MAX_IMAGE_SIZE = 4096  # pixels on a side
MAX_BATCH_SIZE = 2**20  # images or points in one batch
MAX_WIDTH = 8192  # channels of a layer, embedding widths
LIMITS = {
    "data.image_size": MAX_IMAGE_SIZE,
    "model.latent_size": MAX_IMAGE_SIZE,
    "model.low_res": MAX_IMAGE_SIZE,
    "train.batch_size": MAX_BATCH_SIZE,
    "train.num_sample_images": 2**16,
    "data.num_points": 10**8,
    "data.channels": MAX_WIDTH,
    "data.loader_workers": 1024,
    "diffusion.num_timesteps": 10**6,
    "model.num_classes": 10**6,
    "model.text_max_length": 2**14,
    **{f"model.{name}": MAX_WIDTH for name in ("ch", "latent_channels", "context_dim", "pooled_dim")},
    **{f"model.{name}": MAX_WIDTH for name in ("text_heads", "text_width", "image_width", "embed_dim")},
    "model.mlp_hidden": MAX_WIDTH,
    **{f"model.{name}": 1024 for name in ("num_res_blocks", "num_groups", "text_layers", "mlp_layers")},
    "diffusion.lognormal_mean": 100.0,  # (ln sigma: e^100 is far past any chain's noise)
}
SIGNED = {"diffusion.lognormal_mean"}  # the numbers that may be negative: -LIMITS[key]..LIMITS[key]


def validate(cfg: Config) -> None:
    """Check values that would otherwise fail deep inside training with an unclear message."""
    d, m, t, data = cfg.diffusion, cfg.model, cfg.train, cfg.data
    if d.num_timesteps <= 0:
        raise ConfigError(f"diffusion.num_timesteps must be positive, got {d.num_timesteps}")
    for name in ("beta_start", "beta_end"):
        value = getattr(d, name)
        if not 0 < value < 1:
            raise ConfigError(f"diffusion.{name} must be in (0, 1), got {value}")
    for section in (d, m, t, data):  # NaN passes every comparison below, so refuse it first
        for name, value in vars(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{_section_name(cfg, section)}.{name} must be a finite number, got {value}"
                )
    names = ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "sample_every")
    for name in (*names, "num_sample_images"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.grad_clip < 0 or t.warmup_steps < 0:
        raise ConfigError("train.grad_clip (0: none) and train.warmup_steps must be non-negative")
    for name in ("time_limit_minutes", "budget_minutes"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    check_seed(t.seed, "train.seed")
    for section in (d, m, t, data):
        for name, value in vars(section).items():
            key = f"{_section_name(cfg, section)}.{name}"
            high = LIMITS.get(key, 2**63 - 1)
            low = -high if key in SIGNED else 0
            for number in value if isinstance(value, tuple) else (value,):
                if isinstance(number, int | float) and not low <= number <= high:
                    most = LIMITS.get(key, "2**63-1")
                    bound = f"must be >= {low:g}" if number < low else f"must be at most {most}"
                    raise ConfigError(f"{key} {bound}, got {number}")
    if data.channels == 0:  # (images have 1 or 3, checked with the data; 2-D points 2)
        raise ConfigError("data.channels must be positive (or none: the data's own)")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        raise ConfigError(
            f"train.adam_beta1 and adam_beta2 must be in [0, 1), got {t.adam_beta1}, {t.adam_beta2}"
        )
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    for width in (() if t.ema_width is None else (t.ema_width,)) + tuple(t.ema_widths):
        if not 0 < width < MAX_EMA_WIDTH:  # (wider has no power-function profile: a negative exponent)
            raise ConfigError(f"train.ema_width(s) must be in (0, {MAX_EMA_WIDTH:.4f}), got {width}")
    if len(set(t.ema_widths)) != len(t.ema_widths):
        raise ConfigError(f"train.ema_widths must differ from each other, got {t.ema_widths}")
    if d.loss_weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(
            f"diffusion.loss_weighting must be {' or '.join(LOSS_WEIGHTINGS)}, got {d.loss_weighting!r}"
        )
    if d.timestep_sampling not in TIMESTEP_SAMPLINGS:
        choices = " or ".join(TIMESTEP_SAMPLINGS)
        raise ConfigError(f"diffusion.timestep_sampling must be {choices}, got {d.timestep_sampling!r}")
    if not (math.isfinite(d.lognormal_mean) and d.lognormal_std > 0):
        raise ConfigError("diffusion.lognormal_mean must be finite and diffusion.lognormal_std positive")
    if not d.min_snr_gamma > 0:
        raise ConfigError(f"diffusion.min_snr_gamma must be positive, got {d.min_snr_gamma}")
    if not (math.isfinite(d.sigma_data) and d.sigma_data > 0):
        raise ConfigError(f"diffusion.sigma_data must be positive, got {d.sigma_data}")
    check_precision(t.precision, "train.precision", AUTO_PRECISIONS)
    check_compile_mode(t.compile_mode, "train.compile_mode")
    if t.optimizer not in OPTIMIZERS or t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"train.optimizer must be {' or '.join(OPTIMIZERS)} and train.lr_schedule "
            f"{' or '.join(LR_SCHEDULES)}, got {t.optimizer!r} and {t.lr_schedule!r}"
        )
    if not 0 <= t.cond_dropout < 1:
        raise ConfigError(f"train.cond_dropout must be in [0, 1), got {t.cond_dropout}")
    if type(m) is not model_section(m.kind):
        raise ConfigError(f"model.kind is {m.kind!r} on a {type(m).__name__}: set it with model.kind=...")
    if data.labels not in ("none", "classes", "captions"):
        raise ConfigError(f"data.labels must be none, classes or captions, got {data.labels!r}")
    if not 0 <= data.caption_attribute_dropout <= 1:
        raise ConfigError(
            f"data.caption_attribute_dropout must be in [0, 1], got {data.caption_attribute_dropout}"
        )
    if data.caption_attribute_dropout and (data.labels != "captions" or data.dataset == "folder"):
        raise ConfigError(
            "data.caption_attribute_dropout applies to made captions (data.labels=captions on a labelled "
            f"dataset), not to dataset={data.dataset} with labels={data.labels}"
        )
    if m.kind == "text-encoder":
        _validate_text_encoder(cfg)
        return
    if data.labels != "none" and m.kind != "unet":
        what = "class" if data.labels == "classes" else "text"
        raise ConfigError(
            f"{what} conditioning (data.labels={data.labels}) needs the U-Net (model.kind=unet)"
        )
    if (data.labels == "captions") != bool(m.text_encoder):
        raise ConfigError(
            "text conditioning needs both data.labels=captions and model.text_encoder (a folder from "
            "`ddpm train-text-encoder`, or a transformers CLIP / T5 model)"
        )
    if m.text_tower not in TEXT_TOWERS:
        raise ConfigError(f"model.text_tower must be {', '.join(TEXT_TOWERS)}, got {m.text_tower!r}")
    if m.text_tower != "frozen" and not m.text_encoder:
        raise ConfigError(
            f"model.text_tower={m.text_tower} needs a text-conditional run (model.text_encoder)"
        )
    if m.low_res:
        if m.num_classes or m.text_encoder or data.labels != "none":
            raise ConfigError(
                "a super-resolution stage (model.low_res) is an unconditional U-Net: the cascade's classes "
                "or text condition its base model"
            )
        if not 0 < m.low_res < data.image_size:
            raise ConfigError(
                f"model.low_res must be in 1..{data.image_size - 1} (data.image_size), got {m.low_res}"
            )
        if not 1 <= m.low_res_noise_max <= d.num_timesteps + 1:
            raise ConfigError(f"model.low_res_noise_max must be in 1..{d.num_timesteps + 1}")
        if not 0 <= m.low_res_noise <= d.num_timesteps:
            raise ConfigError(f"model.low_res_noise must be in 0..{d.num_timesteps}")
    if data.loader_workers < 0:
        raise ConfigError(f"data.loader_workers must be >= 0, got {data.loader_workers}")
    if t.deferred_checks and not t.fused_optimizer:
        raise ConfigError(
            "train.deferred_checks needs train.fused_optimizer=true (its kernel skips a non-finite step "
            "on the device)"
        )
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    if t.sample_steps is not None and not 1 <= t.sample_steps <= d.num_timesteps:
        raise ConfigError(f"train.sample_steps must be in 1..{d.num_timesteps}")
    if m.kind == "unet" and not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.autoencoder and m.low_res:
        raise ConfigError("latent diffusion (model.autoencoder) needs the U-Net and no model.low_res")
    if m.kind == "autoencoder" and (m.latent_channels <= 0 or m.kl_weight < 0):
        raise ConfigError("model.latent_channels must be positive and model.kl_weight >= 0")
    if m.kind in ("unet", "autoencoder"):
        if m.ch * max(m.ch_mult, default=1) > MAX_WIDTH:
            raise ConfigError(f"model.ch times model.ch_mult's largest must be at most {MAX_WIDTH}")
        if not m.ch_mult or m.ch <= 0 or min(m.ch_mult) <= 0 or m.num_res_blocks <= 0:
            raise ConfigError("model.ch, model.ch_mult and model.num_res_blocks must be positive")
        if m.num_groups <= 0 or m.ch % m.num_groups:
            raise ConfigError(f"model.ch={m.ch} must be divisible by model.num_groups={m.num_groups}")
        # a latent run's U-Net works on latent_size, known once the autoencoder is loaded (the
        # training task checks it then; a checkpoint's config has it)
        if m.latent_size or not m.autoencoder:
            size = m.latent_size if m.autoencoder else data.image_size
            check_levels(m, size, "model.latent_size" if m.autoencoder else "data.image_size")
        for mult in m.ch_mult:
            if (m.ch * mult) % m.num_groups:
                raise ConfigError(
                    f"channels {m.ch * mult} are not divisible by model.num_groups={m.num_groups}"
                )


def check_levels(m: ModelConfig, size: int, what: str) -> None:
    """``size`` (what the network works on, named ``what``) must halve at every level of ``m``."""
    factor = 2 ** (len(m.ch_mult) - 1)
    if size <= 0 or size % factor:
        raise ConfigError(
            f"{what} {size} must be a positive multiple of {factor} for {len(m.ch_mult)} "
            f"{'autoencoder' if m.kind == 'autoencoder' else 'U-Net'} levels"
        )


def _validate_text_encoder(cfg: Config) -> None:
    """The domain CLIP pair trains on captioned images and conditions on nothing itself."""
    m, data = cfg.model, cfg.data
    if data.labels != "captions":
        raise ConfigError(
            "a text encoder (model.kind=text-encoder) trains on captioned images (data.labels=captions)"
        )
    if m.tokenizer not in ("bytes", "bpe"):
        raise ConfigError(f"model.tokenizer must be bytes or bpe, got {m.tokenizer!r}")
    sizes = ("text_width", "text_layers", "text_heads", "text_max_length", "image_width", "embed_dim")
    for name in sizes:
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
    if data.image_size <= 0:  # the image tower's input
        raise ConfigError(f"data.image_size must be positive, got {data.image_size}")
    if m.text_width % m.text_heads:
        raise ConfigError(f"model.text_width={m.text_width} must be divisible by model.text_heads")
    if m.text_max_length < 3:
        raise ConfigError("model.text_max_length must leave room for the start and end tokens (>= 3)")
