import copy
import subprocess
import sys

import pytest
import torch

from ddpm.config import PRECISIONS
from ddpm.errors import ConfigError
from ddpm.runtime import Runtime, resolve_device, wrap_network
from ddpm.unet import GroupNorm, UNet


def small_unet():
    torch.manual_seed(0)
    return UNet(in_channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4).eval()


def test_devices(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device("cuda")
        monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun "cuda" is the rank's GPU, still none here
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_local_rank_picks_the_process_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda:3")
    assert resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # an explicit index wins
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")


def test_fp32_is_the_model_itself_and_bf16_is_autocast_with_fp32_outputs():
    model = small_unet()
    assert wrap_network(model) is model
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    with torch.no_grad():
        plain = model(x, t)
        fast = wrap_network(model, "cpu", "bf16")(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = model(x, t).float()
    assert fast.dtype == torch.float32
    assert torch.equal(fast, reference)
    assert 0 < (fast - plain).abs().max() < 0.1  # bf16 rounding: close, not equal


def test_bf16_norm_is_bf16_with_the_norms_weights_in_bf16():
    # On a CPU, autocast already normalises bf16 activations in bf16 (with fp32 weights); bf16-norm does
    # so with bf16 weights, as CUDA's kernel needs, so it equals bf16 once those weights are rounded.
    model = small_unet()
    for p in model.parameters():
        p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    rounded = copy.deepcopy(model)
    norms = [m for m in rounded.modules() if isinstance(m, GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in rounded.modules()) > 10
    for norm in norms:
        norm.weight.data, norm.bias.data = norm.weight.bfloat16().float(), norm.bias.bfloat16().float()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    with torch.no_grad():
        lean = wrap_network(model, "cpu", "bf16-norm")(x, t)
        autocast = wrap_network(model, "cpu", "bf16")(x, t)
        assert torch.equal(lean, wrap_network(rounded, "cpu", "bf16")(x, t))
        assert torch.equal(wrap_network(model, "cpu", "bf16")(x, t), autocast)  # the mode ends with the call
    assert lean.dtype == torch.float32
    assert 0 < (lean - autocast).abs().max() < 0.05


def test_bf16_norm_survives_compilation(monkeypatch):
    """The norms' mode is a module global read inside the compiled region: dynamo must guard on it, so
    that one model compiled for bf16 and for bf16-norm runs each as in eager mode (dynamo's eager backend
    here, which traces like inductor but compiles in seconds)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, mode=None: compile_(f, backend="eager"))
    torch._dynamo.reset()
    model = small_unet()
    for p in model.parameters():
        p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    try:
        with torch.no_grad():
            for precision in ("bf16", "bf16-norm", "bf16"):
                eager = wrap_network(model, "cpu", precision)(x, t)
                compiled = wrap_network(model, "cpu", precision, compile=True)(x, t)
                assert torch.equal(compiled, eager), precision
    finally:
        torch._dynamo.reset()


def test_the_norms_mode_lasts_while_any_user_has_it_open():
    from ddpm import unet

    first, second = unet.norms_in_bf16(), unet.norms_in_bf16()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # (another thread's call may end first)
    assert unet._NORMS_IN_BF16
    second.__exit__(None, None, None)
    assert not unet._NORMS_IN_BF16


def test_channels_last_changes_layout_not_results():
    model = small_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        plain = model(x, t)
        fast = wrap_network(model, channels_last=True)(x, t)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_precisions_are_checked():
    assert PRECISIONS == ("fp32", "bf16", "bf16-norm")
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, bf16-norm, got 'fp16'"):
        wrap_network(small_unet(), precision="fp16")


def test_a_runtime_is_the_speed_options_as_one_checked_value():
    assert Runtime() == Runtime("auto", "fp32", False, False, "default")  # wrap_network's own defaults
    with pytest.raises(
        ConfigError, match=r"^precision must be one of fp32, bf16, bf16-norm, auto, got 'fp16'$"
    ):
        Runtime(precision="fp16")
    with pytest.raises(ConfigError, match=r"^compile mode must be one of default, .*, got 'fast'$"):
        Runtime(compile_mode="fast")
    runtime = Runtime("cpu", "bf16", channels_last=True)
    assert runtime.resolve() == Runtime(torch.device("cpu"), "bf16", channels_last=True)
    assert runtime.record() == {"precision": "bf16", "channels_last": True}
    compiled = Runtime(compile=True, compile_mode="reduce-overhead")
    assert compiled.record() == {"precision": "fp32", "compile": "reduce-overhead"}
    # wrap is wrap_network with its options: the same outputs, the weights stored channels_last
    model, reference = small_unet(), small_unet()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(runtime.wrap(model)(x, t), wrap_network(reference, "cpu", "bf16", True)(x, t))
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert Runtime("cpu").wrap(model) is model  # fp32 without speed options: the model itself


HEAP_AFTER_FREE = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from ddpm.runtime import keep_freed_memory
    assert keep_freed_memory()
x = torch.ones(16 << 20)  # 64 MiB, above glibc's largest automatic mmap threshold (32 MiB)
del x
print(libc.mallinfo2().fordblks)  # free bytes the heap holds on to
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_a_freed_activation_in_the_heap():
    import ctypes

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc older than 2.33")
    free = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", HEAP_AFTER_FREE, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    assert free["keep"] >= 64 << 20  # kept for the next step's activations
    assert free["default"] < 16 << 20  # unmapped: the next step page-faults it in again


def bench_module(name: str):
    """A script of bench/ as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_passes_every_option_that_runs_on_a_cpu(idx_dir, capsys):
    """bench/gpu_check.py (the GPU's own check) on the CPU: every option it can run there is within
    tolerance of plain fp32, and it says which it skipped."""
    gpu_check = bench_module("gpu_check")
    argv = ["--device", "cpu", "--preset", "fashion-mnist", "--data-dir", str(idx_dir), "--skip", "compile"]
    assert gpu_check.main([*argv, "--steps", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("| bf16 |", "| channels_last |", "| fused adam |", "| DDP, 1 process (gloo) |"):
        assert row in out and out.split(row)[1].split("\n")[0].rstrip().endswith("| ok |"), row
    assert "| cuda graphs | | | | skipped: needs a CUDA GPU |" in out


def test_the_paper_net_bench_reports_every_variant(capsys):
    """bench.py's GPU section (bench.py --device cuda --quick), run on the CPU on a small net: every
    variant that runs without compile is timed for training and sampling, and the table prints."""
    bench = bench_module("bench")
    results = {"machine": bench.machine(), "matmul_peak_flops": {"fp32": 1e11, "bf16": 2e11}}
    results.update({key: {} for key in ("training", "breakdown", "sampling", "memory", "conditioning")})
    bench.bench_paper_net(torch.device("cpu"), True, results, "fashion-mnist", train_batch=4, sample_batch=4)
    section = results["paper_net"]
    variants = {
        f"{impl} {v}" for impl in ("ours", "diffusers") for v in ("fp32", "bf16", "bf16 channels_last")
    }
    assert set(section["train_images_per_s"]) == set(section["sample_evaluations_per_s"])
    assert set(section["train_images_per_s"]) == variants | {"ours bf16-norm"}
    assert all(rate > 0 for rate in section["train_images_per_s"].values())
    bench.report(results)
    out = capsys.readouterr().out
    assert "hours for 800k steps" in out and "| ours bf16-norm |" in out


@pytest.mark.parametrize(
    "bf16_share,chose",
    [(0.5, "bf16"), (0.85, "bf16"), (0.95, "fp32"), (1.4, "fp32")],
)
def test_the_precision_probe_takes_bf16_only_where_it_is_10_percent_faster(bf16_share, chose, monkeypatch):
    """probe_precision times each precision's step (after one untimed call) and takes bf16 only at
    <= 0.9x fp32's time: here on a clock where the fp32 step takes 1 s."""
    import time

    from ddpm import runtime

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    calls = []

    def step(precision):
        calls.append(precision)
        now[0] += 1.0 if precision == "fp32" else bf16_share

    probe = runtime.probe_precision(step, torch.device("cpu"))
    assert probe == {"chose": chose, "seconds": {"fp32": 1.0, "bf16": bf16_share}}
    assert calls == ["fp32"] * (runtime.PROBE_REPEATS + 1) + ["bf16"] * (runtime.PROBE_REPEATS + 1)


@pytest.mark.parametrize("bf16_share,chose", [(0.5, "bf16"), (1.4, "fp32")])
def test_auto_precision_probes_the_first_call_and_runs_every_call_in_the_choice(
    bf16_share, chose, monkeypatch
):
    """A network wrapped in precision "auto" (sampling and the other forward-only commands) times its
    first call in fp32 and bf16 on that call's inputs, then answers it and every later call in the
    faster precision, as that precision's own wrapping would; the choice is recorded once made. Here on
    a clock where an fp32 call takes 1 s."""
    import time

    from ddpm.runtime import PROBE_REPEATS, ProbedPrecision

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    model, calls = small_unet().eval(), []
    forward = model.forward

    def timed(x, t, *cond):
        bf16 = torch.is_autocast_enabled("cpu")
        calls.append("bf16" if bf16 else "fp32")
        now[0] += bf16_share if bf16 else 1.0
        return forward(x, t, *cond)

    monkeypatch.setattr(model, "forward", timed)
    runtime = Runtime("cpu", "auto")
    network = runtime.wrap(model)
    assert isinstance(network, ProbedPrecision) and network.record() == {}
    assert runtime.record(network) == {"precision": "auto"}  # before its first call
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        first, second = network(x, t), network(x, 2 * t)
        expected = [wrap_network(model, precision=chose)(x, s) for s in (t, 2 * t)]
    probe = ["fp32"] * (PROBE_REPEATS + 1) + ["bf16"] * (PROBE_REPEATS + 1)
    assert calls[: len(probe) + 2] == probe + [chose, chose]
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    seconds = {"fp32": 1.0, "bf16": bf16_share}
    assert runtime.record(network) == {
        "precision": chose,
        "precision_probe": {"chose": chose, "seconds": seconds},
    }
    with pytest.raises(ConfigError, match=r"^precision must be one of fp32, bf16, bf16-norm, got 'auto'$"):
        wrap_network(model, precision="auto")  # one precision per wrapping: "auto" is a Runtime's


def test_training_with_auto_precision_is_the_run_with_the_chosen_precision(idx_dir, tmp_path):
    """The probe's steps leave no trace: an "auto" run ends bit-identical to a run that asked for the
    precision the probe chose; the choice is recorded (result, checkpoint, resolved config) and kept on
    resume without a new probe."""
    from conftest import tiny_config

    from ddpm.checkpoint import Checkpoint
    from ddpm.train import Trainer

    auto = Trainer(tiny_config(idx_dir, steps=4, precision="auto"), tmp_path / "auto", progress=False)
    result = auto.train()
    chose = result["precision_probe"]["chose"]
    assert chose in ("fp32", "bf16") and auto.cfg.train.precision == chose
    saved = Checkpoint(tmp_path / "auto")
    assert saved.resolved["train.precision"] == chose and saved.request["train"]["precision"] == "auto"
    assert saved.train_state["precision_probe"] == result["precision_probe"]
    Trainer(tiny_config(idx_dir, steps=4, precision=chose), tmp_path / "asked", progress=False).train()
    asked = Checkpoint(tmp_path / "asked")
    for key, value in saved.model.items():
        assert torch.equal(value, asked.model[key]), key
    resumed = Trainer(tiny_config(idx_dir, steps=6, precision="auto"), tmp_path / "auto", resume=True)
    assert resumed.precision_probe is None and resumed.cfg.train.precision == chose
