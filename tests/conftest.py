import gzip
import struct
from unittest import mock

import numpy as np
import pytest
import torch

from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_betas


def linear(T=1000, **kwargs) -> GaussianDiffusion:
    """The paper's linear schedule (1e-4 -> 0.02) over T steps."""
    return GaussianDiffusion(make_betas("linear", T), **kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gaussian_optimal_eps(d: GaussianDiffusion, mu: float, sigma: float):
    """The exact E[eps | x_t] for data x0 ~ N(mu, sigma^2): the optimal noise predictor."""
    ab = torch.tensor(d.alphas_cumprod).float()

    def model(x, t):
        a = ab[t].reshape(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * mu) / (a * sigma**2 + 1 - a)

    return model


def write_idx(path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(d):
    """A tiny Fashion-MNIST-like directory: 40 train and 10 test images of 8x8 with a bright square."""
    rng = np.random.default_rng(0)
    d.mkdir()
    for name, n in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 60, size=(n, 8, 8))
        images[:, 2:6, 2:6] += 150
        write_idx(d / f"{name}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{name}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=(n,)))
    return d


@pytest.fixture
def idx_dir(tmp_path):
    return make_idx_dir(tmp_path / "idx")


def tiny_config(data_dir, **train) -> Config:
    """A U-Net small enough to train a few steps in well under a second."""
    defaults = dict(
        steps=6,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        ema_decay=0.9,
        log_every=1,
        checkpoint_every=3,
        sample_every=1000,
        num_sample_images=4,
        sample_steps=5,
        device="cpu",
    )
    defaults.update(train)
    return Config(
        name="tiny",
        model=ModelConfig(
            ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, num_groups=4
        ),
        diffusion=DiffusionConfig(num_timesteps=50),
        data=DataConfig(dataset="fashion-mnist", root=str(data_dir), image_size=8),
        train=TrainConfig(**defaults),
    )


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A state dict with the structure of torch-fidelity's InceptionV3 and random weights."""
    from ddpm import inception

    cls = inception._inception_class()
    with (
        mock.patch.object(cls, "load_state_dict", lambda self, sd: None),
        mock.patch(
            "torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}
        ),
    ):
        torch.manual_seed(0)
        model = cls("inception-v3-compat", list(inception.FEATURES))
    for module in model.modules():  # variance-preserving init, so features do not vanish with depth
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def class_run(tmp_path_factory):
    """A tiny class-conditional run (2 steps on the tiny Fashion-MNIST-like data) and its data folder.
    Shared by the tests: copy it before changing it."""
    from ddpm.train import Trainer

    base = tmp_path_factory.mktemp("class-run")
    data = make_idx_dir(base / "idx")
    cfg = tiny_config(data, steps=2)
    cfg.data.labels = "classes"
    Trainer(cfg, base / "run", progress=False).train()
    return base / "run", data


def text_config(data_dir, encoder_dir, **train) -> Config:
    cfg = tiny_config(data_dir, **train)
    cfg.data.labels, cfg.model.text_encoder = "captions", str(encoder_dir)
    return cfg


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A tiny text-conditional run (2 steps) on a tiny domain text encoder, its data and encoder folders.
    Shared by the tests: copy it before changing it."""
    from ddpm.clip import ClipConfig, DomainClip, save_clip
    from ddpm.train import Trainer

    base = tmp_path_factory.mktemp("text-run")
    data = make_idx_dir(base / "idx")
    torch.manual_seed(0)
    config = ClipConfig(width=32, layers=1, heads=2, max_length=40, embed_dim=32, image_width=8)
    save_clip(DomainClip(config), {"format": "ddpm-text-encoder"}, base / "encoder")
    cfg = text_config(data, base / "encoder", steps=2, num_sample_images=20, lr=2e-2)  # weights that show
    Trainer(cfg, base / "run", progress=False).train()
    return base / "run", data, base / "encoder"


@pytest.fixture
def wrap_calls(monkeypatch):
    """The options of every ``wrap_network`` call (device, precision, channels_last, compile, mode), in
    order; torch.compile is stubbed, since what it is given is the point of the tests that use this."""
    from ddpm import runtime

    seen, wrap = [], runtime.wrap_network

    def spy(model, *options):
        seen.append(options)
        return wrap(model, *options)

    monkeypatch.setattr(runtime, "wrap_network", spy)  # (generate's too: through Runtime.wrap)
    monkeypatch.setattr(torch, "compile", lambda f, mode=None: f)
    return seen
