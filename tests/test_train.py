import json
from unittest.mock import ANY

import pytest
import torch
from conftest import tiny_config

from ddpm.checkpoint import Checkpoint
from ddpm.errors import CheckpointError, ConfigError
from ddpm.train import EMA, Trainer, learning_rate


def test_learning_rate_warms_up_linearly_from_zero():
    assert learning_rate(0, 2e-4, 5000) == 0.0
    assert learning_rate(2500, 2e-4, 5000) == pytest.approx(1e-4)
    assert learning_rate(5000, 2e-4, 5000) == 2e-4
    assert learning_rate(10**6, 2e-4, 5000) == 2e-4
    assert learning_rate(0, 2e-4, 0) == 2e-4


def test_ema_starts_at_initial_weights_and_follows_the_formula():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    assert torch.equal(ema.shadow["weight"], w0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))


def test_training_writes_a_complete_run(idx_dir, tmp_path):
    run = tmp_path / "run"
    result = Trainer(tiny_config(idx_dir, sample_every=3), run, progress=False).train()
    assert result["step"] == 6 and result["stopped"] == "done"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["channels"] == 1 and config["train"]["steps"] == 6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(lines[0])
    assert lines[0]["lr"] == 0.0 and lines[2]["lr"] == 1e-3  # warm-up over 2 steps
    assert (run / "samples" / "step_0000003.png").is_file()
    ckpt = Checkpoint(run)
    assert ckpt.train_state["step"] == 6 and ckpt.model and ckpt.ema and ckpt.optimizer
    assert not list(run.glob(".*.tmp"))  # no temporary files left behind


def test_resume_gives_the_same_weights_as_running_straight_through(idx_dir, tmp_path):
    # 40 images in batches of 4: the resumed part crosses the epoch boundary at step 10.
    straight = Trainer(tiny_config(idx_dir, steps=12), tmp_path / "a", progress=False)
    straight.train()

    first = Trainer(tiny_config(idx_dir, steps=5), tmp_path / "b", progress=False)
    first.train()
    del first
    resumed = Trainer(tiny_config(idx_dir, steps=12), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 5
    resumed.train()

    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for group in ("model", "ema", "optimizer"):
        ta, tb = getattr(a, group), getattr(b, group)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{group}.{key} differs after resume"
    # dropout is on in the tiny config, so this also checks that its randomness is reproduced
    assert tiny_config(idx_dir).model.dropout > 0


def test_time_limit_stops_and_checkpoints(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, steps=10_000, time_limit_minutes=1e-9)
    result = Trainer(cfg, tmp_path / "run", progress=False).train()
    assert result["stopped"] == "time limit" and result["step"] == 1
    assert Checkpoint(tmp_path / "run").train_state["step"] == 1
    # Resuming gives the limit afresh (it is per call), so a stopped run can be finished.
    cfg = tiny_config(idx_dir, steps=4, time_limit_minutes=10)
    assert Trainer(cfg, tmp_path / "run", resume=True, progress=False).train()["step"] == 4


def test_resume_refuses_to_change_the_experiment(idx_dir, tmp_path):
    Trainer(tiny_config(idx_dir, steps=1), tmp_path / "run", progress=False).train()
    changed = tiny_config(idx_dir, steps=2, lr=5e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(changed, tmp_path / "run", resume=True, progress=False)


def test_existing_run_needs_resume(idx_dir, tmp_path):
    Trainer(tiny_config(idx_dir, steps=1), tmp_path / "run", progress=False).train()
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume") as refused:
        Trainer(tiny_config(idx_dir), tmp_path / "run", progress=False)
    assert refused.value.field == "resume"  # the CLI says --resume


def test_the_ema_of_every_tensor_at_once_is_bit_identical_to_one_lerp_per_tensor(idx_dir, tmp_path):
    trainer = Trainer(tiny_config(idx_dir), tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    trainer.train_step()  # updates the weights and, with torch._foreach_lerp_, the EMA
    decay = trainer.ema.decay
    for name, value in trainer.model.state_dict().items():
        expected = before[name].lerp(value, 1.0 - decay) if value.is_floating_point() else value
        assert torch.equal(trainer.ema.shadow[name], expected), name


def test_the_fused_optimizer_follows_the_plain_loss_curve(idx_dir, tmp_path):
    """train.fused_optimizer is a speed option: Adam's fused kernel does the same maths (up to float
    rounding, here on the CPU; bench/gpu_check.py compares them on a GPU)."""
    losses, weights = {}, {}
    for fused in (False, True):
        trainer = Trainer(tiny_config(idx_dir, fused_optimizer=fused), tmp_path / str(fused), progress=False)
        assert trainer.optimizer.defaults["fused"] is (True if fused else None)
        losses[fused] = torch.tensor([trainer.train_step()["loss"] for _ in range(5)])
        weights[fused] = trainer.model.conv_in.weight.detach()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)


def test_no_clipping_and_the_cosine_schedule(idx_dir, tmp_path):
    assert learning_rate(50, 1.0, 0, "cosine", 100) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 0, "cosine", 100) == pytest.approx(0.0)
    assert learning_rate(150, 1.0, 0, "cosine", 100) == pytest.approx(0.0)  # stays at 0 past the end
    weights = {}
    for clip in (0.0, 1e9, 1e-3):  # 0: no clipping, the same as a limit never reached
        trainer = Trainer(tiny_config(idx_dir, grad_clip=clip), tmp_path / str(clip), progress=False)
        trainer.train_step(), trainer.train_step()
        weights[clip] = trainer.model.conv_in.weight.detach()
    assert torch.equal(weights[0.0], weights[1e9]) and not torch.equal(weights[0.0], weights[1e-3])
    with pytest.raises(ConfigError, match="train.compile_mode must be one of"):
        Trainer(tiny_config(idx_dir, compile_mode="fast"), tmp_path / "bad", progress=False)


def test_bf16_autocast_follows_the_fp32_loss_curve(idx_dir, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(idx_dir, precision=precision), tmp_path / precision, progress=False)
        losses[precision] = torch.tensor([trainer.train_step()["loss"] for _ in range(6)])
    assert not torch.equal(losses["fp32"], losses["bf16"])  # autocast really ran
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.03, atol=0.01)


def test_channels_last_trains_the_same_and_samples_the_same(idx_dir, tmp_path):
    """The NHWC layout is a speed option: the same loss curve and network outputs up to float rounding
    (weights are not compared: Adam turns rounding-level gradient differences into lr-sized steps)."""
    from ddpm.runtime import wrap_network

    trainers = {}
    for name, channels_last in (("nchw", False), ("nhwc", True)):
        trainer = Trainer(tiny_config(idx_dir, channels_last=channels_last), tmp_path / name, progress=False)
        losses = torch.tensor([trainer.train_step()["loss"] for _ in range(4)])
        trainers[name] = (trainer, losses)
    torch.testing.assert_close(trainers["nhwc"][1], trainers["nchw"][1], rtol=1e-4, atol=1e-5)
    nchw, nhwc = trainers["nchw"][0].model, trainers["nhwc"][0].model
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        plain = nchw.eval()(x, t)
        fast = wrap_network(nchw, channels_last=True)(x, t)
    assert nchw.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_a_run_killed_before_its_final_grid_gets_it_on_resume(idx_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=3), run, progress=False).train()
    grid = run / "samples" / "step_0000003.png"
    grid.unlink()
    (run / ".checkpoint.safetensors.dead.tmp").write_bytes(b"half a checkpoint")
    result = Trainer(tiny_config(idx_dir, steps=3), run, resume=True, progress=False).train()
    assert result == {"step": 3, "stopped": "done"}
    assert grid.is_file() and not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nonfinite_loss_never_reaches_the_weights(idx_dir, tmp_path, mode):
    trainer = Trainer(tiny_config(idx_dir, steps=6, on_nonfinite=mode), tmp_path / "run", progress=False)
    network = trainer.network
    trainer.network = lambda x, t: network(x, t) * (float("nan") if trainer.step == 3 else 1.0)
    for _ in range(3):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    if mode == "stop":
        with pytest.raises(FloatingPointError, match="at step 4; that update was not applied"):
            trainer.train_step()
        assert trainer.step == 3
    else:
        assert trainer.train_step()["skipped"] == 1
        assert trainer.step == 4 and trainer.skipped_steps == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]) and torch.equal(trainer.ema.shadow[name], ema_before[name])
    if mode == "skip":  # and training goes on, with finite weights, a record of the skip, and a checkpoint
        result = trainer.train()
        assert result["step"] == 6 and result["skipped_steps"] == 1
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r.get("skipped")] == []  # step 4 ran outside train()
        ckpt = Checkpoint(tmp_path / "run")
        assert ckpt.train_state["skipped_steps"] == 1
        assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def nan_at_step_4(trainer: Trainer) -> Trainer:
    network = trainer.network
    trainer.network = lambda x, t: network(x, t) * (float("nan") if trainer.step == 3 else 1.0)
    return trainer


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_deferred_checks_train_and_skip_exactly_as_the_per_step_check(idx_dir, tmp_path, optimizer):
    """train.deferred_checks reads nothing back between log / checkpoint steps, yet gives the same weights,
    EMA, Adam state and skip record as checking every step, a non-finite step included."""
    runs = {}
    for deferred in (False, True):
        cfg = tiny_config(
            idx_dir, steps=8, log_every=3, checkpoint_every=5, on_nonfinite="skip", fused_optimizer=True
        )
        cfg.train.optimizer, cfg.train.weight_decay = optimizer, 0.01
        cfg.train.deferred_checks = deferred
        trainer = nan_at_step_4(Trainer(cfg, tmp_path / str(deferred), progress=False))
        assert trainer.train() == {"step": 8, "stopped": "done", "skipped_steps": 1, "train_seconds": ANY}
        runs[deferred] = Checkpoint(tmp_path / str(deferred))
        rows = [
            json.loads(line) for line in (tmp_path / str(deferred) / "metrics.jsonl").read_text().splitlines()
        ]
        # checked every step, the skip is logged at once; deferred, at the next log or checkpoint step
        assert [(r["step"], r.get("skipped")) for r in rows if "skipped" in r] == [
            (5 if deferred else 4, 1.0)
        ]
        assert [r["step"] for r in rows] == ([3, 5, 6, 8] if deferred else [3, 4, 6, 8])
    assert runs[True].train_state["skipped_steps"] == runs[False].train_state["skipped_steps"] == 1
    for group in ("model", "ema", "optimizer"):
        a, b = getattr(runs[False], group), getattr(runs[True], group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    assert all(torch.isfinite(v).all() for v in runs[True].model.values())


def test_deferred_checks_stop_at_the_next_check_with_no_nan_in_the_weights(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, steps=8, log_every=3, checkpoint_every=3, fused_optimizer=True)
    cfg.train.deferred_checks = True
    trainer = nan_at_step_4(Trainer(cfg, tmp_path / "run", progress=False))
    with pytest.raises(FloatingPointError, match=r"at step 4, found at step 6 \(train.deferred_checks\)"):
        trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert Checkpoint(tmp_path / "run").train_state["step"] == 3  # not saved past the non-finite step
    cfg.train.fused_optimizer = False
    with pytest.raises(ConfigError, match="train.deferred_checks needs train.fused_optimizer=true"):
        Trainer(cfg, tmp_path / "unfused", progress=False)


def test_gradient_accumulation_gives_the_full_batch_update(idx_dir, tmp_path):
    """Two micro-batches of 2 make the same step as one batch of 4, within float rounding."""
    runs = {}
    for accum in (1, 2):
        cfg = tiny_config(idx_dir, steps=4, grad_accum=accum)
        cfg.model.dropout = 0.0  # dropout masks are drawn per micro-batch
        runs[accum] = Trainer(cfg, tmp_path / str(accum), progress=False)
        losses = [runs[accum].train_step()["loss"] for _ in range(4)]
        runs[accum].losses = torch.tensor(losses)
    torch.testing.assert_close(runs[2].losses, runs[1].losses, rtol=1e-5, atol=1e-6)
    for name, value in runs[1].model.state_dict().items():
        torch.testing.assert_close(runs[2].model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="must split evenly"):
        Trainer(tiny_config(idx_dir, grad_accum=3), tmp_path / "3", progress=False)


def rewrite_checkpoint(path, change) -> None:
    """Apply ``change(tensors, metadata)`` to a checkpoint file's raw contents."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda t, m: t.update({"ema.conv_in.weight": torch.zeros(3)}),
            "EMA tensor conv_in.weight has shape",
        ),
        (lambda t, m: t.update({"optim.0.exp_avg": torch.zeros(2)}), "optimiser tensor 0.exp_avg has shape"),
        (lambda t, m: t.pop("optim.3.exp_avg_sq"), "optimiser state is incomplete"),
        (lambda t, m: [t.pop(k) for k in list(t) if k.startswith("optim.5.")], "covers"),
    ],
)
def test_a_damaged_checkpoint_is_refused_on_resume(idx_dir, tmp_path, damage, message):
    """Damage that would otherwise fail steps later, deep in Adam or the EMA update, with a traceback."""
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    rewrite_checkpoint(run / "checkpoint.safetensors", damage)
    with pytest.raises(CheckpointError, match=message):
        Trainer(tiny_config(idx_dir, steps=4), run, resume=True, progress=False)


def test_memory_stays_flat_over_a_long_run(idx_dir, tmp_path):
    """1,200 tiny steps with a checkpoint every 10 and a metrics row every step: the resident memory
    grows by less than 50 MiB over the second half's 600 steps and 60 checkpoints (nothing accumulates
    per step or per checkpoint)."""

    def rss_mib() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        pytest.skip("no /proc/self/status here")

    cfg = tiny_config(idx_dir, steps=600, checkpoint_every=10, log_every=1, sample_every=10**6)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.train()
    middle = rss_mib()
    trainer.cfg.train.steps = 1200
    result = trainer.train()
    assert result["step"] == 1200, result
    growth = rss_mib() - middle
    assert growth < 50, f"resident memory grew {growth:.1f} MiB over steps 600-1200"


def test_torch_compile_trains_and_samples_as_eager_does(idx_dir, tmp_path):
    """train.compile (one test: a build costs most of a minute): the same loss curve and, through
    wrap_network, the same network outputs as eager mode, up to float rounding."""
    from ddpm.runtime import wrap_network

    trainers = {}
    for compiled in (False, True):
        cfg = tiny_config(idx_dir, compile=compiled)
        cfg.model.dropout = 0.0  # compiled code draws its dropout masks differently
        trainer = Trainer(cfg, tmp_path / str(compiled), progress=False)
        trainers[compiled] = (trainer, torch.tensor([trainer.train_step()["loss"] for _ in range(3)]))
    assert hasattr(trainers[True][0].network, "_orig_mod")  # really compiled (torch's OptimizedModule)
    torch.testing.assert_close(trainers[True][1], trainers[False][1], rtol=1e-4, atol=1e-5)
    model = trainers[False][0].model.eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 40])
    with torch.no_grad():
        plain = model(x, t)
        fast = wrap_network(model, compile=True, compile_mode="reduce-overhead")(x, t)  # CPU: no graphs
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
