"""Every speed option against the plain fp32 path on one device, failing on any difference beyond tolerance.

    .venv/bin/python bench/gpu_check.py                      # on the GPU (CUDA graphs and NCCL included)
    .venv/bin/python bench/gpu_check.py --device cpu --preset fashion-mnist --skip compile

- Training: the `Trainer` runs the same config (default: the paper's CIFAR-10 network on Fashion-MNIST
  resized to 32x32 in 3 channels, dropout 0 so that compiled and eager code draw no masks) for --steps
  steps from the same weights on the same batches, plainly and with each option; the loss curves must
  agree within the option's tolerance (bf16 rounds; the others only reorder float operations, though
  Adam turns rounding-level gradient differences into lr-sized steps, hence a relative 1e-2).
- Sampling: the network's output on a fixed (x_t, t) batch, and 10 DDIM steps from fixed noise, per
  option against plain fp32 (relative error of the output, RMSE of the samples in [-1, 1]).
- Seeded noise: drawn on the CPU and copied to the GPU without blocking, it must equal the CPU's.
- One process of DistributedDataParallel (NCCL on CUDA, gloo on a CPU): three steps against the same
  steps without it.

Options that only a GPU has (CUDA graphs through compile's reduce-overhead mode) are skipped on a CPU with
a line saying so. On a GPU, plain fp32 convolutions use TF32 (torch's default for cuDNN), so "fp32" there
is itself within ~1e-3 of exact fp32. Prints a table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ddpm.build import build_diffusion, build_model
from ddpm.presets import resolve_config
from ddpm.runtime import keep_freed_memory, wrap_network
from ddpm.samplers import ddim_sample_loop, sampling_chain
from ddpm.train import Trainer

# name -> (train config values, wrap_network options, loss rtol, output rel. error, sample RMSE, needs CUDA)
OPTIONS = {
    "bf16": ({"train.precision": "bf16"}, {"precision": "bf16"}, 0.05, 0.05, 0.1, False),
    "bf16-norm": ({"train.precision": "bf16-norm"}, {"precision": "bf16-norm"}, 0.05, 0.05, 0.1, False),
    "channels_last": ({"train.channels_last": True}, {"channels_last": True}, 1e-2, 1e-3, 1e-2, False),
    "compile": ({"train.compile": True}, {"compile": True}, 1e-2, 1e-3, 1e-2, False),
    "cuda graphs": (
        {"train.compile": True, "train.compile_mode": "reduce-overhead"},
        {"compile": True, "compile_mode": "reduce-overhead"},
        1e-2,
        1e-3,
        1e-2,
        True,
    ),
    "fused adam": ({"train.fused_optimizer": True}, None, 1e-2, None, None, False),
    "deferred checks": (
        {"train.fused_optimizer": True, "train.deferred_checks": True},
        None,
        1e-2,
        None,
        None,
        False,
    ),
    "all": (
        {
            "train.precision": "bf16-norm",
            "train.channels_last": True,
            "train.compile": True,
            "train.compile_mode": "reduce-overhead",
            "train.fused_optimizer": True,
            "train.deferred_checks": True,
        },
        {"precision": "bf16-norm", "channels_last": True, "compile": True, "compile_mode": "reduce-overhead"},
        0.05,
        0.05,
        0.1,
        True,
    ),
}


def config(args, values: dict):
    base = {
        "data.dataset": "fashion-mnist",
        "data.root": args.data_dir,
        "train.device": args.device,
        "train.batch_size": args.batch,
        "train.steps": args.steps,
        "train.log_every": args.steps,
        "train.checkpoint_every": 10**9,
        "train.sample_every": 10**9,
        "train.precision": "fp32",  # the reference (the fashion-mnist preset trains in bf16)
        "train.warmup_steps": 0,  # (a warm-up would leave the zero-initialised output layer near 0)
        "model.dropout": 0.0,
    }
    if args.preset == "cifar10":
        base.update({"data.image_size": 32, "data.channels": 3})
    return resolve_config(None, args.preset, None, {**base, **values})


def train(args, values: dict):
    """The loss curve of --steps steps with ``values`` set, the trained (raw) model, and on a GPU how
    often the steps after the first made the host wait for the device (torch's sync debug mode; None on
    a CPU). The losses are read after the last step, so that only the step's own waits are counted."""
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(config(args, values), Path(run) / "run", progress=False)
        try:
            losses = [trainer.train_step()["loss"]]  # the first: lazy initialisation, allocations
            waits = None
            if torch.device(args.device).type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        losses += [trainer.train_step()["loss"] for _ in range(args.steps - 1)]
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                waits = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
            else:
                losses += [trainer.train_step()["loss"] for _ in range(args.steps - 1)]
            trainer.check_deferred()  # (train.deferred_checks: raises on a non-finite step)
            return torch.tensor([float(loss) for loss in losses]), trainer.model.eval(), waits
        finally:
            trainer.run.unlock()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def sampling_errors(args, model, diffusion, options: dict) -> tuple[float, float]:
    """(relative error of the network output, RMSE of 10 DDIM steps' samples, x0 unclipped) of a copy
    of ``model`` wrapped with ``options`` against ``model`` plain in fp32."""
    import copy

    device = torch.device(args.device)
    shape = (args.batch, model.in_channels, model.resolution, model.resolution)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(shape, generator=g).to(device), torch.randint(0, 1000, (args.batch,), generator=g)
    plain = wrap_network(model, device)
    fast = wrap_network(copy.deepcopy(model), device, **options)  # channels_last converts it in place
    chain = sampling_chain(diffusion, "ddim", 10)
    with torch.inference_mode():
        out = relative(fast(x, t.to(device)), plain(x, t.to(device)))
        samples = [
            ddim_sample_loop(
                chain,
                net,
                shape,
                generator=torch.Generator().manual_seed(1),
                device=device,
                clip_denoised=False,
            )
            for net in (plain, fast)
        ]
    return out, (samples[0] - samples[1]).pow(2).mean().sqrt().item()


def norm_output_dtypes(args, model, precision: str) -> set[torch.dtype]:
    """The dtypes the network's GroupNorms return in one forward pass at ``precision``."""
    device = torch.device(args.device)
    dtypes = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.GroupNorm)
    ]
    shape = (2, model.in_channels, model.resolution, model.resolution)
    try:
        with torch.inference_mode():
            wrap_network(model, device, precision)(
                torch.randn(shape, device=device), torch.tensor([1, 500], device=device)
            )
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def ddp_error(args) -> float:
    """Largest relative difference of three steps' losses under one-process DistributedDataParallel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    # (on a CPU the 1x1 convolutions' gradients come out NHWC-strided, which DDP warns about)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        cfg = config(args, {})
        diffusion = build_diffusion(cfg)
        curves = []
        for wrapped in (False, True):
            torch.manual_seed(0)
            model = build_model(cfg, 3 if args.preset == "cifar10" else 1).to(device)
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            net = net if wrapped else model
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            g = torch.Generator().manual_seed(2)
            shape = (args.batch, model.in_channels, model.resolution, model.resolution)
            curve = []
            for _ in range(3):
                x0 = torch.rand(shape, generator=g).to(device) * 2 - 1
                t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
                noise = torch.randn(shape, generator=g).to(device)
                loss = diffusion.training_losses(net, x0, t, noise)["loss"].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
            curves.append(torch.tensor(curve))
        return relative(curves[1], curves[0])
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="cifar10", help="the network to check (default: the paper's)")
    p.add_argument("--data-dir", help="where Fashion-MNIST is (default: its usual place)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="default 32 on a GPU, 4 on a CPU")
    p.add_argument("--skip", action="append", default=[], help="an option not to check (repeatable)")
    args = p.parse_args(argv)
    keep_freed_memory()
    cuda = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (32 if cuda else 4)
    print("| option | loss curve (max rel. diff) | network output (rel. error) | DDIM-10 samples (RMSE) | |")
    print("|---|---|---|---|---|")
    reference, model, _ = train(args, {})  # sampling is checked on the trained weights
    diffusion = build_diffusion(config(args, {}))
    failed = []
    for name, (values, options, loss_tol, out_tol, sample_tol, needs_cuda) in OPTIONS.items():
        if name in args.skip or (needs_cuda and not cuda):
            why = "skipped" if name in args.skip else "skipped: needs a CUDA GPU"
            print(f"| {name} | | | | {why} |")
            continue
        if any(k in ("compile", "all") for k in args.skip) and values.get("train.compile"):
            print(f"| {name} | | | | skipped (compile) |")
            continue
        curve, _, waits = train(args, values)
        loss_diff = ((curve - reference).abs() / reference.abs()).max().item()
        ok = loss_diff <= loss_tol
        cells = [f"{loss_diff:.2e} (<= {loss_tol:g})", "", ""]
        if waits is not None:  # deferred checks must not make the host wait for the GPU at all
            sync_free = name == "deferred checks"
            ok = ok and (waits == 0 or not sync_free)
            cells[0] += f"; host waits in steps 2-{args.steps}: {waits}" + (
                " (must be 0)" if sync_free else ""
            )
        if options is not None:
            out, rmse = sampling_errors(args, model, diffusion, options)
            ok = ok and out <= out_tol and rmse <= sample_tol
            cells[1:] = [f"{out:.2e} (<= {out_tol:g})", f"{rmse:.2e} (<= {sample_tol:g})"]
        print(f"| {name} | {' | '.join(cells)} | {'ok' if ok else 'FAILED'} |", flush=True)
        if not ok:
            failed.append(name)
    if "bf16-norm" not in args.skip:  # (bf16 on CUDA: fp32, an upcast before each norm and a downcast after)
        dtypes = {p: norm_output_dtypes(args, model, p) for p in ("bf16", "bf16-norm")}
        ok = dtypes["bf16-norm"] == {torch.bfloat16}
        names = {p: "/".join(sorted(str(d).removeprefix("torch.") for d in v)) for p, v in dtypes.items()}
        cells = f"bf16-norm: {names['bf16-norm']} (bf16: {names['bf16']})"
        print(f"| GroupNorm output dtype | {cells} | | | {'ok' if ok else 'FAILED'} |")
        if not ok:
            failed.append("norm dtype")
    if cuda:  # noise drawn on the CPU reaches the GPU through pinned memory, without blocking
        from ddpm.rng import randn

        shape = (args.batch, 3, 32, 32)
        on_gpu = [randn(shape, torch.Generator().manual_seed(i), args.device) for i in range(20)]
        on_cpu = [randn(shape, torch.Generator().manual_seed(i), "cpu") for i in range(20)]
        same = all(torch.equal(a.cpu(), b) for a, b in zip(on_gpu, on_cpu, strict=True))
        print(f"| seeded noise on the GPU = on the CPU | {same} | | | {'ok' if same else 'FAILED'} |")
        if not same:
            failed.append("noise")
    if "ddp" not in args.skip:
        error = ddp_error(args)
        ok = error <= 1e-3
        backend = "NCCL" if cuda else "gloo"
        print(f"| DDP, 1 process ({backend}) | {error:.2e} (<= 1e-3) | | | {'ok' if ok else 'FAILED'} |")
        if not ok:
            failed.append("ddp")
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"gpu_check: every option within tolerance on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
