"""Where and how the network runs: the device, and the network wrapped for the speed options.

Training, sampling, the likelihood, inversion and the figures all get their network from
``wrap_network``, so a speed option means the same thing everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU. Under torchrun (LOCAL_RANK set) "auto" and
    "cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    if isinstance(name, torch.device):
        return name
    local_rank = os.environ.get("LOCAL_RANK")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{int(local_rank)}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA GPU")
    return device


def check_precision(precision: str, what: str = "precision") -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{what} must be {' or '.join(PRECISIONS)}, got {precision!r}")


def wrap_network(
    model: nn.Module,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> Network:
    """``model`` as the callable ``(x, t) -> output`` that the diffusion maths calls.

    - ``precision="bf16"`` runs it under bf16 autocast and returns fp32, so the maths around the
      network stays in fp32 (fp32, the default, is the reference);
    - ``channels_last`` stores its weights (in place) and the inputs in NHWC layout;
    - ``compile`` wraps it in torch.compile (compiled on the first call).
    channels_last and compile do not change the maths, only float rounding, so they are off unless
    asked for."""
    check_precision(precision)
    network: Network = model
    if channels_last:
        model.to(memory_format=torch.channels_last)

        def network(x, t):
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return model(x, t)

    if compile:
        network = torch.compile(network)
    if precision == "bf16":
        inner, device_type = network, torch.device(device).type

        def network(x, t):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return inner(x, t).float()

    return network
