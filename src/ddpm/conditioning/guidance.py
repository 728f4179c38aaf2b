"""Classifier-free guidance (Ho and Salimans, 2022) as a wrapper: a conditional ``model(x, t, cond)``
becomes the plain ``(x, t) -> output`` callable every sampler takes, so no sampler changes.

The scale is Ho and Salimans' w: output = (1 + w) * conditional - w * unconditional, so w = 0 is plain
conditional sampling. Both branches run in one batched forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .condition import Condition, as_condition
from .requests import check_text

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]

# The largest guidance scale taken. Useful scales are 0 to about 10 (Stable Diffusion's 7.5 is w = 6.5);
# at w = 100 the guided output is already dominated by the difference of the branches, and far beyond
# it float32 overflows, so a typo such as 1e308 gave images of only 0 and 255 without a word.
MAX_GUIDANCE = 100.0


def check_guidance(guidance: float, what: str = "guidance") -> None:
    """Guidance is a finite w in [0, MAX_GUIDANCE]."""
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise ConfigError(
            f"{what} must be a finite number >= 0 and at most {MAX_GUIDANCE:g}, got {guidance}", field=what
        )


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as one value, checked when it is made: the scale ``w`` (Ho and Salimans'
    w; 0 is plain conditional sampling), the model timesteps to guide at (``interval``: lo, hi; checked
    against a chain with ``check_interval``), CFG rescale (0 off to 1) and, for text runs, the negative
    prompt (the null branch's text; None: the empty text)."""

    w: float = 0.0
    interval: tuple[int, int] | None = None
    rescale: float = 0.0
    negative_prompt: str | None = None

    def __post_init__(self):
        check_guidance(self.w)
        if not (math.isfinite(self.rescale) and 0 <= self.rescale <= 1):
            raise ConfigError(
                f"guidance_rescale must be in [0, 1], got {self.rescale}", field="guidance_rescale"
            )
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "negative_prompt")

    @property
    def options(self) -> bool:
        """Whether anything beyond the scale was asked for (which only a conditional run takes)."""
        return self.interval is not None or bool(self.rescale)

    def check_interval(self, num_timesteps: int) -> None:
        lo, hi = self.interval if self.interval is not None else (0, 0)
        if not 0 <= lo <= hi < num_timesteps:
            raise ConfigError(
                f"guidance_interval must be (lo, hi) with 0 <= lo <= hi < {num_timesteps}, "
                f"got {self.interval}",
                field="guidance_interval",
            )

    def record(self) -> dict:
        """How it guided, for a command's JSON record."""
        info = {"guidance": self.w}
        if self.interval is not None:
            info["guidance_interval"] = list(self.interval)
        if self.rescale:
            info["guidance_rescale"] = self.rescale
        return info


def guided(
    model: ConditionalModel,
    cond: Condition | torch.Tensor | int,
    null: Condition | torch.Tensor | int,
    scale: float,
    channels: int | None = None,
    interval: tuple[int, int] | None = None,
    rescale: float = 0.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model`` guided towards ``cond`` and away from ``null`` (the unconditional condition, or a
    negative prompt's) with scale ``scale`` (w).

    - ``cond`` / ``null``: a condition (ddpm.conditioning.condition: ClassIds, a TextEncoding / TokenIds,
      ...) per example or one for all (a batch of 1: the null class, or the encoding of one text, a
      negative prompt's as the null); class ids may also be given as an int or a tensor of ids. ``model``
      is called with a condition (ClassIds for class ids), moved to x's device;
    - ``channels``: with a learned variance, how many leading output channels are guided (the prediction);
      the variance channels come from the conditional branch;
    - ``interval``: (lowest, highest) model timestep at which to guide (Kynkaanniemi et al. 2024); outside
      it the conditional branch alone runs;
    - ``rescale``: CFG rescale (Lin et al. 2024), blending the guided output towards one with the
      conditional output's per-example standard deviation, 0 (off) to 1."""
    check_guidance(scale, "scale")
    cond, null = as_condition(cond), as_condition(null)

    def per_example(c: Condition, x: torch.Tensor) -> Condition:
        return c.to(x.device).repeat_to(x.shape[0])

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = per_example(cond, x)
        inside = scale > 0
        if interval is not None:
            inside = inside and bool(((t >= interval[0]) & (t <= interval[1])).all())
        if not inside:
            return model(x, t, c)
        # the conditional and the null condition as one batch
        out = model(torch.cat([x, x]), torch.cat([t, t]), type(c).cat([c, per_example(null, x)]))
        conditional, unconditional = out.chunk(2)
        k = conditional.shape[1] if channels is None else channels
        pred = conditional[:, :k] + scale * (conditional[:, :k] - unconditional[:, :k])
        if rescale > 0:
            dims = tuple(range(1, pred.ndim))
            matched = pred * (
                conditional[:, :k].std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True)
            )
            pred = rescale * matched + (1 - rescale) * pred
        return torch.cat([pred, conditional[:, k:]], dim=1)

    return network


def autoguided(good: Callable[..., torch.Tensor], bad: Callable[..., torch.Tensor], scale: float):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): ``good``
    guided away from ``bad``, a weaker version of the same model (its raw weights against their EMA, or
    an earlier checkpoint of the run), which costs no training: output = (1 + w) * good - w * bad with
    w = ``scale`` (their guidance weight is 1 + w), on the prediction's channels (x's: a learned
    variance's channels are ``good``'s). Called as the models are, ``(x, t)`` or ``(x, t, cond)``, so that
    classifier-free guidance can wrap it: each of its two branches is then autoguided (four network
    passes per step)."""
    check_guidance(scale, "autoguidance")

    def network(x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        out = good(x, t, *cond)
        if scale == 0:
            return out
        k = x.shape[1]
        pred = out[:, :k] + scale * (out[:, :k] - bad(x, t, *cond)[:, :k])
        return torch.cat([pred, out[:, k:]], dim=1)

    return network
