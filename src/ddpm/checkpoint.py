"""Checkpoints: one safetensors file holding model, EMA and optimiser tensors, plus JSON metadata.

No pickle anywhere. A checkpoint is written to a temporary file, fsynced and renamed over the old one,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .files import atomic_write, parse_json

FORMAT = "ddpm-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and plain JSON values."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # load_state_dict checks neither shapes nor completeness; a bad tensor would fail steps later.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensor_keys = {
        frozenset(k for k, v in optimizer.state[p].items() if torch.is_tensor(v))
        for p in params
        if p in optimizer.state
    }
    if len(tensor_keys) > 1:
        raise ValueError("its optimiser state is incomplete (some parameters lack some tensors)")
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape != p.shape:
                shapes = f"{tuple(value.shape)}, its parameter {tuple(p.shape)}"
                raise ValueError(f"optimiser tensor {i}.{key} has shape {shapes}")


def save_checkpoint(
    path: str | Path,
    config: dict,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    request: dict | None = None,
    kept_emas: list[dict[str, torch.Tensor]] = (),
) -> None:
    """Write one checkpoint file atomically. ``config`` is the config the networks were built from;
    ``request`` (default: the same) the config the run was asked for, without what training resolved
    from the data and the run's parts (the data's channels, the classes, a text encoder's width, a
    latent shape). ``kept_emas``: the EMAs of the config's train.ema_widths, in their order."""
    tensors = {f"model.{k}": v for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for i, kept in enumerate(kept_emas, start=1):  # ("ema1.", ...: a width's dot would split the name)
        tensors.update({f"ema{i}.{k}": v for k, v in kept.items()})
    optim_meta = None
    if optimizer is not None:
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config),
        "request": json.dumps(config if request is None else request),
        "train_state": json.dumps(train_state or {}),
        "optimizer": json.dumps(optim_meta),
    }
    try:
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except SafetensorError as e:  # a full disk, say; the previous checkpoint is left as it was
        raise CheckpointError(f"cannot write checkpoint {path}: {e}; the previous one is intact") from None


def resolved_values(config: dict, request: dict) -> dict:
    """The fields where ``config`` differs from ``request`` (config dicts), as {"section.field": value}."""
    return {
        f"{section}.{field}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for field, value in values.items()
        if request.get(section, {}).get(field) != value
    }


class Checkpoint:
    """A loaded checkpoint: config, model / EMA weights, optimiser state and training state.

    ``config`` is the config the networks were built from, ``request`` the one the run was asked for,
    and ``resolved`` ({"section.field": value}) what training resolved from the data and the run's parts
    (checkpoints written before the request was recorded: nothing; their request is their config)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        self.path = path
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is damaged or not a safetensors file ({e})") from None
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a ddpm checkpoint (no '{FORMAT}' format tag)")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise CheckpointError(
                f"checkpoint {path} has format version {version}; this ddpm reads version {FORMAT_VERSION}"
            )
        try:
            # ddpm's own json.dumps, read as written (a NaN latent_scale, a class folder's non-UTF-8
            # name), but never deeper or larger than any JSON ddpm reads
            def read(text, what):
                return parse_json(text, what, error=CheckpointError, strict=False)

            self.config = read(metadata["config"], "its config")
            self.request = read(metadata.get("request", metadata["config"]), "its request")
            self.train_state = read(metadata.get("train_state", "{}"), "its train_state")
            self.optimizer_meta = read(metadata.get("optimizer", "null"), "its optimizer")
        except (KeyError, CheckpointError) as e:
            raise CheckpointError(f"checkpoint {path} has damaged metadata ({e})") from None
        if not all(isinstance(v, dict) for v in (self.config, self.request, self.train_state)):
            raise CheckpointError(
                f"checkpoint {path} has damaged metadata (config, request and train_state must be objects)"
            )
        self.resolved = resolved_values(self.config, self.request)
        if not isinstance(self.optimizer_meta, dict | None):
            raise CheckpointError(f"checkpoint {path} has damaged metadata (optimizer must be an object)")
        step = self.train_state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint {path} has damaged metadata (step {step!r} is not a count)")
        self.model, self.ema, self.optimizer = {}, {}, {}
        groups = {"model": self.model, "ema": self.ema, "optim": self.optimizer}
        widths = self.config.get("train", {}).get("ema_widths") or []
        # the EMAs kept for train.ema_widths (ema1 for the first width, ...)
        self.kept_emas = {width: groups.setdefault(f"ema{i}", {}) for i, width in enumerate(widths, 1)}
        for name, tensor in tensors.items():
            group, _, key = name.partition(".")
            if group not in groups:
                raise CheckpointError(f"checkpoint {path} holds an unexpected tensor {name!r}")
            groups[group][key] = tensor
        if not self.model:
            raise CheckpointError(f"checkpoint {path} holds no model weights")

    @property
    def step(self) -> int:
        """The training steps taken (0 for imported weights)."""
        return self.train_state.get("step", 0)

    def weights(self, use_ema: bool = True, ema_width: float | None = None) -> dict[str, torch.Tensor]:
        """The raw weights, the EMA, or (``ema_width``) the kept EMA of that width."""
        if ema_width is not None:
            if not use_ema:
                raise ConfigError("ema_width chooses a kept EMA: not the raw weights", field="ema_width")
            kept = {w: ema for w, ema in self.kept_emas.items() if ema}
            if ema_width not in kept:
                have = ", ".join(f"{w:g}" for w in kept) or "none (see train.ema_widths)"
                raise CheckpointError(
                    f"checkpoint {self.path} has no ema_width {ema_width:g}; it keeps: {have}",
                    field="ema_width",
                )
            return kept[ema_width]
        if use_ema and not self.ema and self.train_state.get("model_is_ema"):
            return self.model
        if use_ema and not self.ema:
            raise CheckpointError(
                f"checkpoint {self.path} has no EMA weights: use its raw weights (use_ema)", field="use_ema"
            )
        return self.ema if use_ema else self.model
