"""Where and how the network runs: the device, the processes (torchrun), and the network wrapped for
the speed options.

Training, sampling, the likelihood, inversion and the figures all get their network from
``wrap_network`` (the last four through one ``Runtime`` value and ``ddpm.build.load_network``), so a speed
option means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .config import AUTO_PRECISIONS, check_compile_mode, check_precision
from .errors import ConfigError
from .unet import norms_in_bf16

Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves each large block (an activation of a few MB) with its own mmap and unmaps it
    on free, so every network forward on the CPU page-faults its activations in afresh; in a sampling
    loop that costs about 20% of the time, and more at twice the batch (guided sampling). Setting the
    mmap and trim thresholds high keeps those pages in the heap (the process's resident memory stays at
    its peak instead of shrinking between steps). The CLI and the benchmark call this at start; call it
    yourself from Python for the same speed. Returns False where there is no glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    keep = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap
    return bool(mallopt(m_mmap_threshold, keep)) and bool(mallopt(m_trim_threshold, keep))


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


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def wrap_network(
    model: nn.Module | Network,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
) -> Network:
    """``model`` as the callable ``(x, t) -> output`` that the diffusion maths calls.

    - ``precision="bf16"`` runs it under bf16 autocast and returns fp32, so the maths around the
      network stays in fp32 (fp32, the default, is the reference); ``"bf16-norm"`` also keeps the
      activations in bf16 through the U-Net's GroupNorms (``ddpm.unet.norms_in_bf16``), which CUDA
      autocast would upcast to fp32 and back;
    - ``channels_last`` stores its weights (in place) and the inputs in NHWC layout;
    - ``compile`` wraps it in torch.compile (compiled on the first call) in ``compile_mode``
      ("reduce-overhead" replays CUDA graphs: a step's kernel launches cost the CPU nothing);
    channels_last and compile do not change the maths, only float rounding, so they are off unless
    asked for."""
    check_precision(precision)
    check_compile_mode(compile_mode)
    network: Network = model
    if channels_last:
        if not isinstance(model, nn.Module):
            raise TypeError("channels_last stores a module's weights in NHWC; got a plain callable")
        model.to(memory_format=torch.channels_last)

        def network(x, t, *cond):
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return model(x, t, *cond)

    if compile:
        compiled = network = torch.compile(network, mode=compile_mode)
        if compile_mode in CUDA_GRAPH_MODES and torch.device(device).type == "cuda":

            def network(x, t, *cond):
                # A CUDA graph's replay writes its outputs where the last replay wrote them: each call
                # starts a new step, and its output is copied out before the next one can overwrite it.
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, t, *cond).clone()

    if precision in ("bf16", "bf16-norm"):
        inner, device_type = network, torch.device(device).type
        norms = norms_in_bf16 if precision == "bf16-norm" else contextlib.nullcontext

        def network(x, t, *cond):
            with torch.autocast(device_type, dtype=torch.bfloat16), norms():
                return inner(x, t, *cond).float()

    return network


@dataclass(frozen=True)
class Runtime:
    """Where and how a network runs, as one value: what sampling, inversion, the likelihood and the
    figures take (the CLI's --device, --precision, --channels-last, --compile and --compile-mode; training
    reads the same five from its config's train section).

    ``device``: auto (the GPU when there is one), cpu, cuda or cuda:N (``resolve_device``, when the
    network is loaded); the others: see ``wrap_network``. A bad precision or compile mode is a one-line
    ConfigError when the value is made."""

    device: str | torch.device = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self):
        check_precision(self.precision, choices=AUTO_PRECISIONS)
        check_compile_mode(self.compile_mode)

    def resolve(self) -> Runtime:
        """This runtime on a definite device: "auto" becomes cuda or cpu (see ``resolve_device``)."""
        return replace(self, device=resolve_device(self.device))

    def wrap(self, model: nn.Module | Network) -> Network:
        """``model`` as the network the maths calls, on this runtime (``wrap_network``); precision "auto":
        a ``ProbedPrecision`` (forward only: training resolves "auto" itself, from its own step)."""
        device = resolve_device(self.device)
        speed = (self.channels_last, self.compile, self.compile_mode)
        if self.precision == "auto":
            return ProbedPrecision({p: wrap_network(model, device, p, *speed) for p in PROBED}, device)
        return wrap_network(model, device, self.precision, *speed)

    def record(self, probed: ProbedPrecision | None = None) -> dict:
        """How the network ran, for a command's JSON record: the precision (with "auto", once ``probed``
        has run: the one it chose, and its probe), and the speed options that were on (they change float
        rounding, not the maths)."""
        return {
            "precision": self.precision,
            **(probed.record() if probed is not None else {}),
            **({"channels_last": True} if self.channels_last else {}),
            **({"compile": self.compile_mode} if self.compile else {}),
        }


PROBE_REPEATS = 3  # timed calls per precision, after one untimed (allocation, kernel choice)
BF16_GAIN = 0.9  # bf16 is chosen only when it takes at most this share of fp32's time
PROBED = ("fp32", "bf16")  # what precision "auto" chooses between


def probe_precision(step: Callable[[str], object], device: torch.device) -> dict:
    """Time ``step(precision)`` (a training step's forward and backward, or a network call) in fp32 and
    in bf16 autocast on this machine, and choose bf16 only where it is at least 10% faster: it was 1.45x
    faster on a Xeon with AMX and 1.42x slower on one without (issue 23), so no default holds for every
    machine. Returns the choice and the seconds per call of each."""
    import time

    seconds = {}
    for precision in PROBED:
        step(precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(PROBE_REPEATS):
            step(precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[precision] = round((time.perf_counter() - start) / PROBE_REPEATS, 6)
    chose = "bf16" if seconds["bf16"] <= BF16_GAIN * seconds["fp32"] else "fp32"
    return {"chose": chose, "seconds": seconds}


class ProbedPrecision:
    """A network in precision "auto" where it only runs forward (sampling, the likelihood, inversion,
    the figures): its first call is timed in fp32 and in bf16 on that call's own inputs
    (``probe_precision``: 8 extra calls), and that call and every later one run in the faster. Under
    torchrun each process probes for itself. ``probe``: the choice and the seconds of each, once made."""

    def __init__(self, networks: dict[str, Network], device: torch.device):
        self.networks, self.device = networks, device
        self.probe: dict | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        if self.probe is None:
            self.probe = probe_precision(lambda p: self.networks[p](x, t, *cond), self.device)
        return self.networks[self.probe["chose"]](x, t, *cond)

    def record(self) -> dict:
        """The precision that ran and the probe that chose it (nothing before the first call)."""
        if self.probe is None:
            return {}
        return {"precision": self.probe["chose"], "precision_probe": self.probe}


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun).

    Every collective here is a no-op for a single process, so single-process results never depend on
    this module."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that writes files (checkpoints, logs, images)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is set on any process (so that all processes act alike)."""
        if not self.distributed:
            return [bool(f) for f in flags]
        import torch.distributed as dist

        values = torch.tensor([float(f) for f in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_host_group())
        return [bool(v) for v in values.tolist()]

    def largest(self, value: float) -> float:
        """The largest of every process's ``value``."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        values = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=_host_group())
        return float(values.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        total = value.detach().clone().to(_collective_device())
        dist.all_reduce(total)
        return (total / self.world_size).to(value.device)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every process's ``tensor`` (shapes may differ), on the CPU of the main process; None elsewhere."""
        if not self.distributed:
            return [tensor.cpu()]
        import torch.distributed as dist

        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(tensor.cpu(), parts, dst=0)
        return parts


_HOST_GROUP = None  # see _host_group


def _host_group():
    """A gloo group of the same processes, for flags that live on the host (signals, the time limit):
    over NCCL, agreeing on one would queue behind the GPU's work and read it back, a wait for the device
    at every training step."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        import torch.distributed as dist

        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def finish_processes() -> None:
    """Leave the process group together: without it, a process that exits while another still talks
    to it can die with SIGABRT in gloo's teardown."""
    import torch.distributed as dist

    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _HOST_GROUP = None


def init_processes(device: torch.device) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL for CUDA
    devices, gloo otherwise. Without torchrun, a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A generous timeout: rank 0 may write a checkpoint or score samples while the others wait.
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return Processes(dist.get_rank(), dist.get_world_size())
