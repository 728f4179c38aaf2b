"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel, 2020), faithful and usable.

import ddpm
cfg = ddpm.preset("fashion-mnist")
ddpm.Trainer(cfg, "runs/fm").train()
model, diffusion, cfg = ddpm.load_model("runs/fm")
images = ddpm.generate(model, diffusion, num=16, shape=(1, 28, 28), steps=100)
"""

from .build import build_diffusion, build_model, load_model, load_network
from .checkpoint import Checkpoint
from .config import Config
from .data import load_dataset
from .diffusion import GaussianDiffusion, LossType, MeanType, VarType
from .errors import CheckpointError, ConfigError, DataError, DDPMError
from .images import save_grid, to_model_range, to_uint8
from .pipeline import Pipeline
from .presets import preset
from .runtime import Runtime, wrap_network
from .sample import SampleOptions, generate, sample_to_dir
from .samplers import SAMPLERS, sampling_chain
from .schedules import make_betas
from .train import Trainer
from .unet import UNet

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DDPMError",
    "DataError",
    "GaussianDiffusion",
    "LossType",
    "MeanType",
    "Pipeline",
    "Runtime",
    "SAMPLERS",
    "SampleOptions",
    "Trainer",
    "UNet",
    "VarType",
    "build_diffusion",
    "build_model",
    "generate",
    "load_dataset",
    "load_model",
    "load_network",
    "make_betas",
    "preset",
    "sample_to_dir",
    "sampling_chain",
    "save_grid",
    "to_model_range",
    "to_uint8",
    "wrap_network",
]
