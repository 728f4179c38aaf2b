"""The named configurations (`ddpm presets`), and resolving a run's config from them: preset -> config
file -> values -> `section.field=value` overrides. configs/NAME.json is preset NAME written out
(`python scripts/write_configs.py` writes them; tests/test_presets.py keeps them equal)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import (
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    TrainConfig,
    apply_dict,
    parse_override,
    read_config_file,
    set_value,
)
from .errors import ConfigError


def _preset_cifar10() -> Config:
    """The paper's CIFAR-10 model and training, exactly (35,746,307 parameters)."""
    return Config(
        name="cifar10",
        data=DataConfig(dataset="cifar10", image_size=32),
    )


def _preset_256(name: str, steps: int) -> Config:
    """The paper's 256x256 model (113,673,219 parameters): CelebA-HQ / LSUN, from an image folder."""
    return Config(
        name=name,
        model=ModelConfig(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
        diffusion=DiffusionConfig(var_type="fixedsmall"),
        # The paper flipped CelebA-HQ and LSUN Church but not LSUN Bedroom (the 2.4M-step lsun256 run).
        data=DataConfig(dataset="folder", image_size=256, random_flip=name != "lsun256"),
        train=TrainConfig(steps=steps, batch_size=64, lr=2e-5, sample_steps=250),
    )


def _preset_fashion_mnist() -> Config:
    """A small U-Net tuned for good Fashion-MNIST samples in about 10 minutes on 2 CPU cores.

    Departures from the paper, each chosen by measurement on this budget (see docs/results.md): a
    1.1M-parameter network (ch 32, one res block per level, two downsamplings, attention at 7x7, GroupNorm
    with 8 groups; at equal time it beat the 1.6M two-block net on domain FID, 57.1 vs 61.8 on 2026-11-24,
    a 57.1 not reproduced since: see docs/results.md), no dropout, a 5x larger learning rate with a
    100-step warm-up, batch 64, EMA decay 0.995 (0.9999 would still be near the initial weights after
    1,375 steps), precision "auto" (bf16 autocast where a probe of the run's first step finds it at least
    10% faster: 1.9x on a Xeon with AMX, 1.42x slower on one without), the fixed-small variance, which
    gives clean samples on 100 respaced steps where fixed-large leaves visible grain, no horizontal flips
    (Fashion-MNIST's shoes all face left: a half-flipped copy of the real test images scores domain FID 44.75
    against the test split), and min-SNR-5 loss weighting (Hang et al. 2023). Each measured at the demo's
    1,375 steps (docs/results.md, 2026-12-07): with flips 69.37 at 5,000 samples; without, 22.46 at a
    2,000-sample screen, 17.47 with min-SNR.
    """
    return Config(
        name="fashion-mnist",
        model=ModelConfig(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), dropout=0.0, num_groups=8
        ),
        diffusion=DiffusionConfig(var_type="fixedsmall", loss_weighting="min-snr"),
        data=DataConfig(dataset="fashion-mnist", image_size=28, random_flip=False),
        train=TrainConfig(
            steps=1375,
            batch_size=64,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.995,
            precision="auto",
            log_every=50,
            checkpoint_every=200,
            sample_every=700,
            sample_steps=100,
        ),
    )


def _preset_fashion_mnist_25min() -> Config:
    """The fashion-mnist preset trained to a 25-minute budget (training time, on the machine in use: the
    run times its first steps and fixes its step count; 5,691 steps on a 2-core Xeon with AMX)."""
    cfg = _preset_fashion_mnist()
    cfg.name = "fashion-mnist-25min"
    cfg.train.budget_minutes = 25.0
    cfg.train.sample_every = 2000
    return cfg


def _preset_fashion_mnist_class() -> Config:
    """The fashion-mnist preset conditioned on the ten class labels (condition dropout 0.1 trains the
    unconditional branch for guidance), with a 10 x 10 training grid: a row per class. Same network,
    steps and time as the unconditional preset, so their FIDs compare at equal training time."""
    cfg = _preset_fashion_mnist()
    cfg.name = "fashion-mnist-class"
    cfg.data.labels = "classes"
    cfg.train.num_sample_images = 100
    return cfg


def _preset_fashion_mnist_text() -> Config:
    """The fashion-mnist preset conditioned on captions ("a photo of a large dark coat") through the
    frozen domain text encoder that `ddpm train-text-encoder --out runs/text-encoder` trains first
    (cross-attention at 7x7 and in the middle, the pooled text added to the time embedding); a 10 x 10
    training grid, a row per class prompt. Half the captions lose their attribute words, so that "a photo
    of a coat" asks for any coat: at 1,375 steps and w = 0.5 that took domain FID from 20.78 to 13.84
    (docs/results.md, 5,000 samples)."""
    cfg = _preset_fashion_mnist()
    cfg.name = "fashion-mnist-text"
    cfg.data.labels = "captions"
    cfg.data.caption_attribute_dropout = 0.5
    cfg.model.text_encoder = "runs/text-encoder"
    cfg.train.num_sample_images = 100
    return cfg


def _preset_fashion_mnist_text_14() -> Config:
    """The base of the cascaded text-to-image pipeline: fashion-mnist-text at 14x14 (U-Net levels 14 and
    7, attention and cross-attention at 7x7); fashion-mnist-sr takes its samples to 28x28."""
    cfg = _preset_fashion_mnist_text()
    cfg.name = "fashion-mnist-text-14"
    cfg.data.image_size = 14
    cfg.model.ch_mult = (1, 2)
    cfg.train.steps = 4000
    cfg.train.checkpoint_every, cfg.train.sample_every = 500, 2000
    return cfg


def _preset_fashion_mnist_sr() -> Config:
    """The cascade's super-resolution stage, 14x14 -> 28x28 (Ho et al. 2022): the fashion-mnist U-Net with
    the 14x14 image, upsampled (bilinear) and noise-augmented, as a second input channel and its
    augmentation level embedded into the time embedding. Trained on real pairs with no text: levels drawn
    from 0..249 of the schedule, sampled at level 50."""
    cfg = _preset_fashion_mnist()
    cfg.name = "fashion-mnist-sr"
    cfg.model.low_res = 14
    return cfg


def _preset_fashion_mnist_autoencoder() -> Config:
    """Latent diffusion's first stage for Fashion-MNIST: a KL autoencoder from 1x28x28 to 4x14x14 latents
    (levels of 32 and 64 channels, one residual block each), trained like the fashion-mnist preset. At
    equal training budget its latent generator matched the pixel model's FID where one on 4x7x7 latents
    (`--set model.ch_mult=1,2,2`) fell 38% short (docs/results.md)."""
    cfg = _preset_fashion_mnist()
    cfg.name = "fashion-mnist-autoencoder"
    cfg.model = ModelConfig(kind="autoencoder", ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)
    cfg.model.latent_channels, cfg.model.kl_weight = 4, 1e-6
    cfg.train.steps = 4000
    return cfg


def _preset_fashion_mnist_latent_text() -> Config:
    """The latent generator of the text-to-image pipeline: fashion-mnist-text on the 4x14x14 latents of the
    autoencoder in runs/autoencoder (U-Net levels 14 and 7, self- and cross-attention at 7); sampling
    decodes with it."""
    cfg = _preset_fashion_mnist_text()
    cfg.name = "fashion-mnist-latent-text"
    cfg.model.autoencoder = "runs/autoencoder"
    cfg.model.ch_mult = (1, 2)
    cfg.train.steps = 4000
    cfg.train.checkpoint_every, cfg.train.sample_every = 500, 2000
    return cfg


def _preset_fashion_mnist_text_encoder() -> Config:
    """The domain CLIP pair that the text presets condition on: a 3-layer, 128-wide causal transformer
    over UTF-8 bytes and a 3-convolution image tower, trained contrastively on the made captions for 600
    steps of 256 (AdamW, weight decay 0.01, 100 warm-up steps then cosine decay, no clipping, no flips)."""
    return Config(
        name="fashion-mnist-text-encoder",
        model=ModelConfig(kind="text-encoder"),
        data=DataConfig(dataset="fashion-mnist", image_size=28, random_flip=False, labels="captions"),
        train=TrainConfig(
            steps=600,
            batch_size=256,
            lr=1e-3,
            warmup_steps=100,
            optimizer="adamw",
            weight_decay=0.01,
            lr_schedule="cosine",
            grad_clip=0.0,  # none: clipped at 1, its zero-shot accuracy was 61.7% against 62.8%
            ema_decay=0.0,  # the cosine decay already settles the weights: the run exports its last ones
            log_every=50,
            checkpoint_every=100,
            sample_every=600,
        ),
    )


def _preset_toy2d() -> Config:
    """2-D point clouds with an MLP denoiser and the linear schedule 1e-5 -> 2e-3 over T = 1000."""
    return Config(
        name="toy2d",
        model=ModelConfig(kind="mlp", mlp_hidden=128, mlp_layers=3),
        diffusion=DiffusionConfig(beta_start=1e-5, beta_end=2e-3),
        data=DataConfig(dataset="swiss-roll", image_size=0, random_flip=False),
        train=TrainConfig(
            steps=4000,
            batch_size=256,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.995,
            log_every=100,
            checkpoint_every=1000,
            sample_every=4000,
            num_sample_images=2000,
        ),
    )


PRESETS = {
    "cifar10": _preset_cifar10,
    "celebahq256": lambda: _preset_256("celebahq256", 500_000),
    "lsun256": lambda: _preset_256("lsun256", 2_400_000),
    "fashion-mnist": _preset_fashion_mnist,
    "fashion-mnist-25min": _preset_fashion_mnist_25min,
    "fashion-mnist-class": _preset_fashion_mnist_class,
    "fashion-mnist-text": _preset_fashion_mnist_text,
    "fashion-mnist-text-14": _preset_fashion_mnist_text_14,
    "fashion-mnist-sr": _preset_fashion_mnist_sr,
    "fashion-mnist-autoencoder": _preset_fashion_mnist_autoencoder,
    "fashion-mnist-latent-text": _preset_fashion_mnist_latent_text,
    "fashion-mnist-text-encoder": _preset_fashion_mnist_text_encoder,
    "toy2d": _preset_toy2d,
}


def preset(name: str) -> Config:
    if not isinstance(name, str) or name not in PRESETS:  # a config file's `preset` may be any value
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def preset_json(name: str) -> str:
    """Preset ``name`` as configs/NAME.json holds it: what `ddpm config --preset NAME` prints."""
    return json.dumps(preset(name).to_dict(), indent=2) + "\n"


# ---- a run's config: preset, file, values, overrides ----


def load_file(path: str | Path, base: Config | None = None) -> Config:
    """A JSON or TOML config file; values not in the file come from ``base`` (or the file's ``preset``)."""
    d = read_config_file(path)
    start = d.pop("preset", None)
    # Without a preset named in the file or given, start from the CLI's default preset.
    cfg = copy.deepcopy(base) if base is not None else preset(start or "fashion-mnist")
    apply_dict(cfg, d)
    return cfg


def resolve_config(
    base: Config | None = None,
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    values: dict[str, object] | None = None,
    overrides: list[str] = (),
) -> Config:
    """Preset -> config file -> ``values`` ({"train.lr": 1e-4, ...}; None values are skipped) ->
    ``section.field=value`` overrides, later ones winning. ``base``, a run's own config (for resuming),
    replaces the first two: a resumed run cannot take another preset or file."""
    if base is not None:
        if preset_name or config_file:
            raise ConfigError("a resumed run keeps its own config: no preset or config file, only overrides")
        cfg = base
    elif config_file:
        cfg = load_file(config_file, base=preset(preset_name) if preset_name else None)
    else:
        cfg = preset(preset_name or "fashion-mnist")
    for key, value in (values or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    for text in overrides:
        set_value(cfg, *parse_override(text))
    return cfg
