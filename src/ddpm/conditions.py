"""What a run is conditioned on, and how a user's request (a class, a guidance scale) becomes the network
a sampler calls.

Class ids are 0..K-1 in the order of ``cfg.data.class_names``; id K is the null class (the unconditional
branch that condition dropout trains). Guidance is Ho and Salimans' w (w = 0 is conditional sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .diffusion import VarType, parse_option
from .errors import ConfigError
from .guidance import guided


def class_index(cfg, name: str | int) -> int:
    """The id of a class given by name or index, for a class-conditional run's config."""
    names = list(cfg.data.class_names)
    if str(name) in names:
        return names.index(str(name))
    if str(name).isdigit() and int(name) < cfg.model.num_classes:
        return int(name)
    raise ConfigError(f"unknown class {name!r}; this run's classes: {', '.join(names)}")


def check_request(cfg, class_name: str | int | None, guidance: float = 0.0) -> int | None:
    """The class id asked for (None: none), after checking that this run can take the request."""
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {guidance}")
    if cfg.model.num_classes == 0 and (class_name is not None or guidance):
        raise ConfigError("this model is unconditional: --class and --guidance need a class-conditional run")
    return None if class_name is None else class_index(cfg, class_name)


def balanced_classes(num: int, num_classes: int) -> torch.Tensor:
    """Class ids for ``num`` samples in equal contiguous blocks (example i gets i * K // num), so that a
    grid has one row per class and every class is equally represented (to within one)."""
    return torch.arange(num) * num_classes // num


def guided_network(
    network,
    cfg,
    guidance: float,
    interval: tuple[int, int] | None = None,
    rescale: float = 0.0,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``network(x, t, class_ids)`` (ids per example, or one int for all) guided with scale w away from
    the null class. With a learned variance only the prediction's channels are guided (the variance is
    the conditional branch's)."""
    learned = parse_option(VarType, cfg.diffusion.var_type, "variance type").learned
    channels = cfg.data.channels if learned else None
    null = cfg.model.num_classes

    def conditional(x: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor | int) -> torch.Tensor:
        return guided(network, class_ids, null, guidance, channels, interval, rescale)(x, t)

    return conditional


def for_class(network, cfg, class_name: str | int | None, guidance: float = 0.0):
    """A plain ``(x, t)`` network for one requested class (guided with w), or, with no class, the null
    class's (the unconditional branch; a class-conditional network given no class takes it)."""
    index = check_request(cfg, class_name, guidance)
    if index is None:
        if guidance:
            raise ConfigError("--guidance needs --class (the class to guide towards)")
        return network
    conditional = guided_network(network, cfg, guidance)
    return lambda x, t: conditional(x, t, index)
