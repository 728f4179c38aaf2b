"""Speed and memory of ddpm against diffusers on identical work, in one command.

    .venv/bin/python bench/bench.py            # everything (about 20 minutes on 2 CPU cores)
    .venv/bin/python bench/bench.py --quick    # fewer timed steps, 100-step ancestral sampling

Both sides use the same network: diffusers' UNet2DModel built from `diffusers_unet_config` (the paper's
architecture; equal parameter counts are checked), the same batch, loss (eps MSE), optimiser (Adam, grad
clip 1) and dropout. Timings alternate between the implementations and report the median of repeats.
Peak memory is measured in fresh child processes, the median of three per workload (on CPU the peak RSS
of building the network and running two steps, over the RSS after imports; on CUDA the peak allocated),
so one workload's freed memory cannot hide another's. On CPU a profiled breakdown splits a step's time into
convolutions and everything else, the Amdahl bound on what bf16 can gain. Prints markdown tables with ratios
(ours / diffusers; > 1 means ours is faster or, for memory, larger) and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ddpm.build import build_diffusion, build_model
from ddpm.conditioning import with_condition
from ddpm.convert import diffusers_unet_config
from ddpm.presets import preset
from ddpm.runtime import keep_freed_memory, wrap_network
from ddpm.sample import generate
from ddpm.text import TextEncoding

NETS = {  # name -> (preset, CPU batch, GPU batch)
    "fashion-mnist preset (1.1M)": ("fashion-mnist", 64, 256),
    "CIFAR-10 paper net (35.7M)": ("cifar10", 16, 128),
}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "bf16_matmul_support": torch.backends.mkldnn.is_available(),
        "date": time.strftime("%Y-%m-%d"),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, repeats=10) -> float:
    """Best FLOP/s of an n x n matmul: the machine's practical peak for dense work."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---- the two implementations behind one call signature: net(x, t) -> eps ----


def make_net(
    impl: str, preset_name: str, device, channels_last=False, compile_=False, num_classes=0, context_dim=0
):
    """``impl`` "ours", "diffusers" (UNet2DModel) or "diffusers-condition" (UNet2DConditionModel, for
    class or text conditioning); with ``num_classes`` the forward takes class ids, with ``context_dim``
    a TextEncoding: ``forward(x, t, y)``."""
    cfg = preset(preset_name)
    cfg.model.num_classes, cfg.model.context_dim = num_classes, context_dim
    size, channels = cfg.data.image_size, cfg.data.channels or (1 if "mnist" in preset_name else 3)
    torch.manual_seed(0)
    if impl == "ours":
        module = build_model(cfg, channels)
        forward = module
    else:
        from diffusers import UNet2DConditionModel, UNet2DModel

        config = diffusers_unet_config(cfg.model, size, channels)
        if num_classes:  # diffusers adds the class embedding to the time embedding too (id K: null)
            config["num_class_embeds"] = num_classes + 1
        if impl == "diffusers-condition":
            # The nearest it comes to the paper's net: its self-attention mid block (UNetMidBlock2D)
            # has one ResNet block and no attention, so it has fewer parameters than ours.
            widths = config["block_out_channels"]
            config.update(
                mid_block_type="UNetMidBlock2D",
                attention_head_dim=tuple(widths),
                cross_attention_dim=widths[-1],
            )
            if context_dim:
                # Text: its transformer blocks (self-attention, cross-attention to the tokens, a
                # feed-forward) where ours has self-attention then cross-attention, heads of 32 channels
                # as ours (diffusers reads attention_head_dim as the head count here), and the pooled
                # embedding projected into the time embedding as our text_pool.
                cross = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}
                config.update(
                    down_block_types=tuple(cross.get(b, b) for b in config["down_block_types"]),
                    up_block_types=tuple(cross.get(b, b) for b in config["up_block_types"]),
                    mid_block_type="UNetMidBlock2DCrossAttn",
                    attention_head_dim=tuple(w // 32 for w in widths),
                    cross_attention_dim=context_dim,
                    class_embed_type="projection",
                    projection_class_embeddings_input_dim=context_dim,
                )
            module = UNet2DConditionModel(**config)

            def forward(x, t, y):
                if context_dim:
                    return module(
                        x,
                        t,
                        encoder_hidden_states=y.tokens,
                        encoder_attention_mask=y.mask,
                        class_labels=y.pooled,
                    ).sample
                return module(x, t, encoder_hidden_states=None, class_labels=y).sample

        else:
            module = UNet2DModel(**config)

            def forward(x, t, y=None):
                return module(x, t, class_labels=y).sample

    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile_:
        forward = torch.compile(forward)
    return module, forward, cfg, (channels, size, size)


class TrainStep:
    """Algorithm 1 for either network: q_sample, eps MSE, Adam with grad clip."""

    def __init__(
        self,
        impl,
        preset_name,
        batch,
        device,
        precision,
        channels_last=False,
        compile_=False,
        num_classes=0,
        context_dim=0,
        compile_mode=None,
        fused=False,
    ):
        """``compile_mode``: compile through ``wrap_network`` in that torch.compile mode (reduce-overhead:
        CUDA graphs); ``fused``: Adam's fused kernel."""
        self.module, self.forward, cfg, shape = make_net(
            impl, preset_name, device, channels_last, compile_, num_classes, context_dim
        )
        self.diffusion = build_diffusion(cfg)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=1e-4, fused=fused or None)
        self.device, self.precision = device, precision
        g = torch.Generator().manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.x0 = (torch.rand(batch, *shape, generator=g) * 2 - 1).to(device, memory_format=memory_format)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device, memory_format=memory_format)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        compiled = dict(compile=True, compile_mode=compile_mode) if compile_mode else {}
        self.net = wrap_network(self.forward, device, precision, **compiled)  # the same autocast as training
        if num_classes:  # class ids, a tenth of them the null class (condition dropout)
            y = torch.randint(0, num_classes, (batch,), generator=g)
            y[torch.rand(batch, generator=g) < 0.1] = num_classes
            self.net = with_condition(self.net, y.to(device))
        if context_dim:  # frozen-encoder states of captions of 6 to 16 tokens (the padding masked)
            tokens = torch.randn(batch, 16, context_dim, generator=g)
            mask = torch.arange(16)[None] < torch.randint(6, 17, (batch, 1), generator=g)
            text = TextEncoding(tokens, mask, torch.randn(batch, context_dim, generator=g)).to(device)
            self.net = with_condition(self.net, text)

    def __call__(self):
        self.module.train()
        loss = self.diffusion.training_losses(self.net, self.x0, self.t, self.noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()

    def flops(self) -> float:
        """FLOPs of one forward + backward. FlopCounterMode does not count the CPU flash-attention
        kernel behind scaled_dot_product_attention (~3% of the paper net's work), so FLOP/s is
        slightly understated."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.module.train()
            loss = self.diffusion.training_losses(self.forward, self.x0, self.t, self.noise)["loss"].mean()
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_training(device, quick, compile_, results):
    gpu = device.type == "cuda"
    repeats = 3 if quick else 6
    variants = [
        ("ours", "fp32", {}),
        ("diffusers", "fp32", {}),
        ("ours", "bf16", {}),
        ("diffusers", "bf16", {}),
    ]
    variants += [("ours", "fp32", {"channels_last": True}), ("ours", "bf16", {"channels_last": True})]
    if compile_:
        variants += [("ours", "fp32", {"compile_": True}), ("ours", "bf16", {"compile_": True})]
    for net_name, (preset_name, cpu_batch, gpu_batch) in NETS.items():
        batch = gpu_batch if gpu else cpu_batch
        steps = {}
        for impl, precision, options in variants:
            step = TrainStep(impl, preset_name, batch, device, precision, **options)
            step(), step()  # warm-up (allocator, autocast caches, Adam state)
            steps[(impl, precision, tuple(options))] = step
        counts = {impl: sum(p.numel() for p in s.module.parameters()) for (impl, _, _), s in steps.items()}
        assert counts["ours"] == counts["diffusers"], f"parameter counts differ: {counts}"
        seconds = {key: [] for key in steps}
        for _ in range(repeats):  # interleaved, so drifts in machine load hit every variant alike
            for key, step in steps.items():
                seconds[key].append(timed(step, device, 1))
        rows = {}
        for (impl, precision, options), values in seconds.items():
            label = f"{impl} {precision}" + "".join(f" {o.rstrip('_')}" for o in options)
            rows[label] = batch / statistics.median(values)
        flops = steps[("ours", "fp32", ())].flops()
        results["training"][net_name] = {
            "batch": batch,
            "params": counts["ours"],
            "images_per_s": {k: round(v, 2) for k, v in rows.items()},
            "flops_per_image": flops / batch,
        }
        del steps


class SampleForward:
    """One network evaluation of a sampling step (inference mode) at a fixed batch, for either network."""

    def __init__(self, impl, preset_name, batch, device, precision, channels_last=False, compile_mode=None):
        self.module, forward, _, shape = make_net(impl, preset_name, device, channels_last)
        self.module.eval()
        g = torch.Generator().manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(batch, *shape, generator=g).to(device, memory_format=memory_format)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        compiled = dict(compile=True, compile_mode=compile_mode) if compile_mode else {}
        self.net = wrap_network(forward, device, precision, **compiled)

    @torch.inference_mode()
    def __call__(self):
        self.net(self.x, self.t)


PAPER_STEPS, PAPER_BATCH, FID_SAMPLES = 800_000, 128, 50_000  # the paper's CIFAR-10 training, FID-50k


def bench_paper_net(device, quick, results, preset_name="cifar10", train_batch=128, sample_batch=256):
    """The GPU question: training img/s and sampling network evaluations/s of the paper's network, ours
    and diffusers' in every variant (compiled ones on a GPU only: a CPU compile takes minutes), and the
    hours they project for the paper's 800k steps (batch 128) and a 1,000-step FID-50k. "fast" is every
    speed option at once: bf16-norm, channels_last, compile with CUDA graphs (reduce-overhead), fused
    Adam. The first word of a variant's name is its precision."""
    gpu = device.type == "cuda"
    plain = [("fp32", {}), ("bf16", {}), ("bf16 channels_last", {"channels_last": True})]
    train_variants = [(impl, name, opts) for name, opts in plain for impl in ("ours", "diffusers")]
    train_variants.append(("ours", "bf16-norm", {}))  # (diffusers has no such option)
    if gpu:  # each compiled variant costs a build of about a minute: --quick keeps two
        compiled = {"compile_mode": "default"}
        fast = {"channels_last": True, "compile_mode": "reduce-overhead", "fused": True}
        impls = ("diffusers",) if quick else ("ours", "diffusers")
        train_variants += [(impl, "bf16 compile", compiled) for impl in impls]
        train_variants.append(("ours", "bf16-norm fast", fast))
    repeats = 5 if quick else 15
    section = results["paper_net"] = {"preset": preset_name, "train_batch": train_batch}
    steps = {}
    for impl, name, opts in train_variants:
        precision = name.split()[0]
        step = TrainStep(impl, preset_name, train_batch, device, precision, **opts)
        for _ in range(3):  # warm-up: compilation, CUDA graph capture, allocator, Adam state
            step()
        steps[(impl, name)] = step
    seconds = {key: [] for key in steps}
    for _ in range(repeats):  # interleaved
        for key, step in steps.items():
            seconds[key].append(timed(step, device, 1))
    section["train_images_per_s"] = {
        f"{impl} {name}": train_batch / statistics.median(v) for (impl, name), v in seconds.items()
    }
    del steps
    forwards = {}
    for impl, name, opts in train_variants:  # the same variants, without the optimiser
        opts = {k: v for k, v in opts.items() if k != "fused"}
        forward = SampleForward(impl, preset_name, sample_batch, device, name.split()[0], **opts)
        for _ in range(3):
            forward()
        forwards[(impl, name)] = forward
    seconds = {key: [] for key in forwards}
    for _ in range(repeats):
        for key, forward in forwards.items():
            seconds[key].append(timed(forward, device, 1))
    section["sample_batch"] = sample_batch
    section["sample_evaluations_per_s"] = {
        f"{impl} {name}": sample_batch / statistics.median(v) for (impl, name), v in seconds.items()
    }


def profiled_split(step, repeats=3) -> dict:
    """Seconds per step inside convolutions (forward and backward, including oneDNN's layout reorders,
    which run inside them) and outside them, from torch.profiler's self times on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / repeats
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1e6 / repeats
    return {"conv_s": conv, "rest_s": total - conv}


def bench_breakdown(device, results):
    """Where a training step's time goes, convolutions vs the rest, for ours fp32/bf16 and diffusers
    fp32: bf16 only speeds up the convolutions on a CPU, which bounds the bf16 speed-up (Amdahl)."""
    if device.type != "cpu":
        return
    for net_name, (preset_name, cpu_batch, _) in NETS.items():
        split = {}
        for impl, precision in (("ours", "fp32"), ("ours", "bf16"), ("diffusers", "fp32")):
            step = TrainStep(impl, preset_name, cpu_batch, device, precision)
            step(), step()
            split[f"{impl} {precision}"] = profiled_split(step)
            del step
        results["breakdown"][net_name] = split


def bench_sampling(device, quick, results):
    """Per-image sampling time on the fashion-mnist net: ours vs diffusers' pipelines."""
    from diffusers import (
        DDIMPipeline,
        DDIMScheduler,
        DDPMPipeline,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
    )

    batch = 16
    ancestral_steps = 100 if quick else 1000
    ours, _, cfg, shape = make_net("ours", "fashion-mnist", device)
    theirs, _, _, _ = make_net("diffusers", "fashion-mnist", device)
    ours.eval(), theirs.eval()
    diffusion = build_diffusion(cfg)
    betas = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    cases = [
        ("ancestral", ancestral_steps, DDPMPipeline, DDPMScheduler(**betas, variance_type="fixed_small")),
        ("ddim", 50, DDIMPipeline, DDIMScheduler(**betas)),
        ("dpm++2m", 20, DDPMPipeline, DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++")),
    ]

    def null(x, t):  # a network that costs nothing: what is left is the sampler's own work
        return torch.zeros_like(x)

    for sampler, steps, pipeline_cls, scheduler in cases:
        pipe = pipeline_cls(unet=theirs, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        for precision in ("fp32", "bf16"):
            run_ours = partial(generate, ours, diffusion, batch, shape, batch, 0, steps, True, device, False)
            run_ours = partial(run_ours, precision, sampler)
            run_theirs = partial(run_pipeline, pipe, batch, steps, device, precision)
            t_ours, t_theirs = timed(run_ours, device, 1), timed(run_theirs, device, 1)
            results["sampling"][f"{sampler} {steps} steps {precision}"] = {
                "ours_s_per_image": t_ours / batch,
                "diffusers_s_per_image": t_theirs / batch,
            }
            if precision == "fp32":
                run_null = partial(generate, null, diffusion, batch, shape, batch, 0, steps, True, device)
                t_null = timed(partial(run_null, False, "fp32", sampler), device, 1)
                results["sampling"][f"{sampler} {steps} steps fp32"]["ours_overhead_fraction"] = (
                    t_null / t_ours
                )


def bench_conditioning(device, quick, results):
    """Class conditioning on the fashion-mnist net: a conditional training step against the same
    unconditional one (target: at most 10% dearer) and against diffusers' class-conditional UNets
    (UNet2DModel with the same parameters, and UNet2DConditionModel as near as it can be configured);
    text conditioning (cross-attention to 16 token states of width 128) against UNet2DConditionModel with
    cross-attention at the same resolutions; then guided sampling (w = 2, both branches in one batched
    forward) against unguided (target: at most 2.1x the time)."""
    from ddpm.conditioning import guided_network

    batch = 256 if device.type == "cuda" else 64
    repeats = 3 if quick else 6
    variants = {  # (implementation, classes, text width)
        "ours unconditional": ("ours", 0, 0),
        "ours class": ("ours", 10, 0),
        "diffusers UNet2DModel class": ("diffusers", 10, 0),
        "diffusers UNet2DConditionModel class": ("diffusers-condition", 10, 0),
        "ours text": ("ours", 0, 128),
        "diffusers UNet2DConditionModel text": ("diffusers-condition", 0, 128),
    }
    for precision in ("fp32", "bf16"):
        steps = {}
        for name, (impl, classes, width) in variants.items():
            steps[name] = TrainStep(
                impl, "fashion-mnist", batch, device, precision, num_classes=classes, context_dim=width
            )
            steps[name](), steps[name]()
        seconds = {name: [] for name in steps}
        for _ in range(repeats):  # interleaved
            for name, step in steps.items():
                seconds[name].append(timed(step, device, 1))
        results["conditioning"][f"training {precision}"] = {
            name: {
                "images_per_s": round(batch / statistics.median(values), 2),
                "params": sum(p.numel() for p in steps[name].module.parameters()),
            }
            for name, values in seconds.items()
        }
        del steps
    model, _, cfg, shape = make_net("ours", "fashion-mnist", device, num_classes=10)
    model.eval()
    diffusion = build_diffusion(cfg)
    sample_steps, n = (20 if quick else 50), 64
    labels = torch.arange(n) % 10
    times = {}
    for w in (0.0, 2.0):  # w = 0 runs the conditional branch alone
        network = guided_network(model, cfg, w)
        run = partial(generate, network, diffusion, n, shape, n, 0, sample_steps, True, device, False)
        times[w] = [timed(partial(run, "fp32", "ddim", cond=labels), device, 1) for _ in range(repeats // 2)]
    results["conditioning"]["guided sampling"] = {
        "steps": sample_steps,
        "batch": n,
        "unguided_s": statistics.median(times[0.0]),
        "guided_s": statistics.median(times[2.0]),
    }


def run_pipeline(pipe, batch, steps, device, precision):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np")


def _proc_status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_child(queue, impl, preset_name, batch, device_name, precision):
    """Peak memory of building the network and running two training steps, over the process's
    footprint after its imports (the same imports for both implementations).

    On CPU this is the peak RSS (VmHWM) after resetting it at the baseline. getrusage's ru_maxrss
    cannot be used: Linux carries it across fork and exec, so a child spawned by a parent that had
    grown to several GiB (the training section) reports the parent's size and a growth of zero."""
    from diffusers import UNet2DModel  # noqa: F401  (diffusers loads model code lazily: import it on
    # both sides before the baseline, so its ~70 MiB of code is not counted against diffusers)

    keep_freed_memory()  # as the CLI does
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    step = TrainStep(impl, preset_name, batch, device, precision)
    step(), step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status_bytes("VmHWM") - base
    queue.put(peak)


def bench_memory(device, results, repeats=3):
    """Median over `repeats` fresh children per workload: on CPU one child's peak RSS varies by about
    +-30 MiB with the allocator's timing, as much as the differences being measured."""
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("memory: skipped; peak RSS is read from Linux's /proc/self", file=sys.stderr)
        return
    ctx = multiprocessing.get_context("spawn")
    for net_name, (preset_name, cpu_batch, gpu_batch) in NETS.items():
        batch = gpu_batch if device.type == "cuda" else cpu_batch
        peaks = {}
        for _ in range(repeats):  # interleaved, like the timings
            for precision in ("fp32", "bf16"):
                for impl in ("ours", "diffusers"):
                    queue = ctx.Queue()
                    args = (queue, impl, preset_name, batch, str(device), precision)
                    proc = ctx.Process(target=_memory_child, args=args)
                    proc.start()
                    peaks.setdefault(f"{impl} {precision}", []).append(queue.get())
                    proc.join()
        results["memory"][net_name] = {k: statistics.median(v) for k, v in peaks.items()}


def report(results):
    m = results["machine"]
    print(
        f"\nMachine: {m['cpu']} ({m['threads']} threads), GPU {m['gpu']}; torch {m['torch']}, "
        f"diffusers {m['diffusers']}; {m['date']}"
    )
    peaks = results["matmul_peak_flops"]
    print(
        f"Matmul peak (2048^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s\n"
    )
    if results["training"]:
        print(
            "| training step | batch | variant | images/s | vs diffusers, same precision | "
            "vs diffusers fp32 | FLOP/s (% of the matmul peak of its precision) |"
        )
        print("|---|---|---|---|---|---|---|")
    for net, r in results["training"].items():
        rates = r["images_per_s"]
        for variant, rate in rates.items():
            impl, precision = variant.split()[:2]
            same = rate / rates[f"diffusers {precision}"]
            flops = rate * r["flops_per_image"]
            utilisation = f"{flops / 1e9:.0f} GFLOP/s ({100 * flops / peaks[precision]:.0f}%)"
            print(
                f"| {net} | {r['batch']} | {variant} | {rate:.1f} | {same:.2f}x | "
                f"{rate / rates['diffusers fp32']:.2f}x | {utilisation if impl == 'ours' else ''} |"
            )
    if results.get("paper_net"):
        r = results["paper_net"]
        print(
            f"| {r['preset']} net | training images/s (batch {r['train_batch']}) | vs diffusers fp32 | "
            f"hours for {PAPER_STEPS // 1000}k steps | sampling evaluations/s (batch {r['sample_batch']}) | "
            "hours for a 1,000-step FID-50k |"
        )
        print("|---|---|---|---|---|---|")
        base = r["train_images_per_s"]["diffusers fp32"]
        for variant, rate in r["train_images_per_s"].items():
            evals = r["sample_evaluations_per_s"][variant]
            train_hours = PAPER_STEPS * PAPER_BATCH / rate / 3600
            print(
                f"| {variant} | {rate:,.0f} | {rate / base:.2f}x | {train_hours:.1f} | "
                f"{evals:,.0f} | {FID_SAMPLES * 1000 / evals / 3600:.2f} |"
            )
    if results.get("breakdown"):
        print(
            "\n| where a training step's time goes (profiled, ms/step) | convolutions | everything else | "
            "bf16 vs diffusers fp32 if everything else took no time | everything else allowed for 1.8x |"
        )
        print("|---|---|---|---|---|")
        for net, split in results["breakdown"].items():
            theirs = split["diffusers fp32"]["conv_s"] + split["diffusers fp32"]["rest_s"]
            for variant, r in split.items():
                bound = allowed = ""
                if variant == "ours bf16":
                    bound = f"{theirs / r['conv_s']:.2f}x"
                    allowed = f"{1e3 * max(theirs / 1.8 - r['conv_s'], 0):.0f}"
                print(
                    f"| {net}, {variant} | {1e3 * r['conv_s']:.0f} | {1e3 * r['rest_s']:.0f} | {bound} | "
                    f"{allowed} |"
                )
    if results["sampling"]:
        print(
            "\n| sampling (fashion-mnist net, batch 16) | ours ms/image | diffusers ms/image | ratio | "
            "ours: time outside the network |"
        )
        print("|---|---|---|---|---|")
        for key, r in results["sampling"].items():
            overhead = r.get("ours_overhead_fraction")
            print(
                f"| {key} | {1e3 * r['ours_s_per_image']:.1f} | {1e3 * r['diffusers_s_per_image']:.1f} | "
                f"{r['diffusers_s_per_image'] / r['ours_s_per_image']:.2f}x | "
                f"{'' if overhead is None else f'{100 * overhead:.2f}%'} |"
            )
    if results.get("conditioning"):
        print(
            "\n| conditioning, fashion-mnist net, training step | params | images/s | "
            "vs ours unconditional | vs diffusers (class: UNet2DModel; text: UNet2DConditionModel) |"
        )
        print("|---|---|---|---|---|")
        for key, rows in results["conditioning"].items():
            if not key.startswith("training"):
                continue
            base = rows["ours unconditional"]
            for name, r in rows.items():
                # text rows against diffusers' text UNet2DConditionModel, class rows against UNet2DModel
                peer = rows.get(
                    "diffusers UNet2DConditionModel text" if "text" in name else "diffusers UNet2DModel class"
                )
                versus = f"{r['images_per_s'] / peer['images_per_s']:.2f}x" if peer else ""
                print(
                    f"| {name}, {key.split()[1]} | {r['params']:,} | {r['images_per_s']:.1f} | "
                    f"{base['images_per_s'] / r['images_per_s']:.3f}x the time | {versus} |"
                )
        g = results["conditioning"]["guided sampling"]
        print(
            f"\nGuided sampling (w = 2, DDIM {g['steps']} steps, batch {g['batch']}): "
            f"{g['guided_s']:.2f} s vs {g['unguided_s']:.2f} s unguided = "
            f"{g['guided_s'] / g['unguided_s']:.2f}x (target <= 2.1x)"
        )
    if results["memory"]:
        print(
            "\n| peak memory of a training step | ours fp32 | diffusers fp32 | ratio | ours bf16 | "
            "diffusers bf16 | ratio |"
        )
        print("|---|---|---|---|---|---|---|")
        for net, r in results["memory"].items():
            mb = {k: v / 2**20 for k, v in r.items()}
            print(
                f"| {net} | {mb['ours fp32']:.0f} MiB | {mb['diffusers fp32']:.0f} MiB | "
                f"{mb['ours fp32'] / mb['diffusers fp32']:.2f} | {mb['ours bf16']:.0f} MiB | "
                f"{mb['diffusers bf16']:.0f} MiB | {mb['ours bf16'] / mb['diffusers bf16']:.2f} |"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats; 100-step ancestral sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile", action="store_true", help="also time ours under torch.compile (slow to build)"
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["paper-net", "training", "breakdown", "sampling", "memory", "conditioning"],
    )
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = p.parse_args(argv)
    keep_freed_memory()  # as the CLI does; both implementations run under it
    device = torch.device(args.device)
    results = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "training": {},
        "breakdown": {},
        "sampling": {},
        "memory": {},
        "conditioning": {},
    }
    results["matmul_peak_flops"] = {
        "fp32": matmul_peak(device, torch.float32),
        "bf16": matmul_peak(device, torch.bfloat16),
    }
    if device.type == "cuda" and "paper-net" not in args.skip:
        bench_paper_net(device, args.quick, results)
    if device.type == "cuda" and args.quick:  # the GPU question alone: under 5 minutes
        args.skip += ["training", "breakdown", "sampling", "memory", "conditioning"]
    if "training" not in args.skip:
        bench_training(device, args.quick, args.compile, results)
    if "breakdown" not in args.skip:
        bench_breakdown(device, results)
    if "sampling" not in args.skip:
        bench_sampling(device, args.quick, results)
    if "memory" not in args.skip:
        bench_memory(device, results)
    if "conditioning" not in args.skip:
        bench_conditioning(device, args.quick, results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    report(results)


if __name__ == "__main__":
    main()
