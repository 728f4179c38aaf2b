"""Training as real processes: torchrun (gloo on CPU), signals, SIGKILLs and a second owner."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from ddpm.checkpoint import Checkpoint

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def write_config(path: Path, idx_dir, **train) -> Path:
    cfg = tiny_config(idx_dir, **train)
    cfg.model.dropout = 0.0
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def ddpm(*args, torchrun: list[str] | None = None, **popen) -> subprocess.Popen:
    """`python -m ddpm ARGS`, or under `torchrun TORCHRUN -m ddpm ARGS`."""
    head = [TORCHRUN, *torchrun, "-m", "ddpm"] if torchrun is not None else [PYTHON, "-m", "ddpm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets, so that every run computes alike
    return subprocess.Popen(
        [*head, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(condition, timeout: float = 60, what: str = "the condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    ca, cb = Checkpoint(a), Checkpoint(b)
    assert ca.step == cb.step
    for group in ("model", "ema"):
        for name, value in getattr(ca, group).items():
            torch.testing.assert_close(getattr(cb, group)[name], value, rtol=0, atol=atol)


def test_two_processes_train_like_one_and_resume_at_another_count(idx_dir, tmp_path):
    """torchrun with 2 gloo processes: each takes its half of the global batch drawn from the step's
    generator, so the weights equal a single process's up to float rounding (here ~1e-7), and a run
    resumes with a different process count."""
    config = write_config(tmp_path / "c.json", idx_dir, steps=6, checkpoint_every=3, log_every=1)
    one = finish(ddpm("train", "--config", config, "--out", tmp_path / "one", "--no-progress"))
    two = finish(
        ddpm(
            "train",
            "--config",
            config,
            "--out",
            tmp_path / "two",
            "--no-progress",
            torchrun=["--standalone", "--nproc_per_node=2"],
        )
    )
    assert one[0] == 0 and two[0] == 0, (one[2][-2000:], two[2][-2000:])
    assert json.loads(two[1].strip().splitlines()[-1])["step"] == 6  # one JSON line: rank 0's
    assert Checkpoint(tmp_path / "two").train_state["world_size"] == 2
    assert logged_steps(tmp_path / "two") == [1, 2, 3, 4, 5, 6]
    assert_close_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)

    # the 2-process run continues in 1 process, the 1-process run in 2: both as the straight 8 steps
    straight = write_config(tmp_path / "c8.json", idx_dir, steps=8, checkpoint_every=3, log_every=1)
    assert (
        finish(ddpm("train", "--config", straight, "--out", tmp_path / "straight", "--no-progress"))[0] == 0
    )
    assert finish(ddpm("train", "--resume", tmp_path / "two", "--steps", 8, "--no-progress"))[0] == 0
    resumed = ddpm(
        "train",
        "--resume",
        tmp_path / "one",
        "--steps",
        8,
        "--no-progress",
        torchrun=["--standalone", "--nproc_per_node=2"],
    )
    assert finish(resumed)[0] == 0
    assert_close_weights(tmp_path / "straight", tmp_path / "two", atol=1e-5)
    assert_close_weights(tmp_path / "straight", tmp_path / "one", atol=1e-5)
    assert logged_steps(tmp_path / "one") == list(range(1, 9))


def test_two_nodes_over_loopback(idx_dir, tmp_path):
    """Multi-node torchrun (2 nodes of 1 process, gloo over 127.0.0.1) trains like one process."""
    config = write_config(tmp_path / "c.json", idx_dir, steps=4, log_every=1)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        ddpm(
            "train",
            "--config",
            config,
            "--out",
            tmp_path / f"node{rank}",
            "--no-progress",
            torchrun=[
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ],
        )
        for rank in (0, 1)
    ]
    results = [finish(p) for p in nodes]
    assert all(r[0] == 0 for r in results), [r[2][-2000:] for r in results]
    assert (tmp_path / "node0" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "node1" / "checkpoint.safetensors").exists()  # only rank 0 writes
    assert finish(ddpm("train", "--config", config, "--out", tmp_path / "one", "--no-progress"))[0] == 0
    assert_close_weights(tmp_path / "one", tmp_path / "node0", atol=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_says_how_to_resume(idx_dir, tmp_path, signum):
    config = write_config(tmp_path / "c.json", idx_dir, steps=100_000, checkpoint_every=10_000, log_every=1)
    run = tmp_path / "run"
    process = ddpm("train", "--config", config, "--out", run, "--no-progress")
    wait_for(lambda: len(logged_steps(run)) >= 3, what="training to start")
    process.send_signal(signum)
    code, out, err = finish(process)
    assert code == 128 + signum, err[-2000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped"] == signal.Signals(signum).name
    assert f"stopped by {signal.Signals(signum).name} at step {stopped['step']}" in err
    assert f"ddpm train --resume {run}" in err and "Traceback" not in err
    assert Checkpoint(run).step == stopped["step"] and logged_steps(run)[-1] == stopped["step"]


@pytest.mark.parametrize("deferred", [False, True])
def test_torchrun_processes_agree_on_the_step_to_stop_at(idx_dir, tmp_path, deferred):
    """Signals are agreed on every step (over a gloo group: no wait for a GPU), deferred checks or not."""
    log_every = 3 if deferred else 1
    speed = dict(fused_optimizer=True, deferred_checks=True) if deferred else {}
    config = write_config(
        tmp_path / "c.json", idx_dir, steps=100_000, checkpoint_every=10_000, log_every=log_every, **speed
    )
    run = tmp_path / "run"
    process = ddpm(
        "train",
        "--config",
        config,
        "--out",
        run,
        "--no-progress",
        torchrun=["--standalone", "--nproc_per_node=2"],
    )
    wait_for(lambda: len(logged_steps(run)) >= 3, what="training to start")
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    finish(process)
    step = Checkpoint(run).step
    assert step >= 3
    assert logged_steps(run) == [s for s in range(1, step + 1) if s % log_every == 0]
    assert finish(ddpm("train", "--resume", run, "--steps", step + 2, "--no-progress"))[0] == 0
    assert logged_steps(run) == [s for s in range(1, step + 3) if s % log_every == 0 or s == step + 2]


def test_a_live_run_has_one_owner(idx_dir, tmp_path):
    """Two `ddpm train --out D` at once: one trains, the other stops with one line; so does a second
    --resume of the live run. A SIGKILL frees the directory for the resume."""
    config = write_config(tmp_path / "c.json", idx_dir, steps=100_000, checkpoint_every=5, log_every=1)
    run = tmp_path / "run"
    racers = [ddpm("train", "--config", config, "--out", run, "--no-progress") for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in racers), what="one of two racing runs to give up")
    loser = next(p for p in racers if p.poll() is not None)
    winner = next(p for p in racers if p is not loser)
    code, _, err = finish(loser)
    assert code == 2 and err.count("\n") == 1, err[-2000:]
    assert f"in use by another ddpm process (pid {winner.pid})" in err or "already holds a run" in err
    wait_for(
        lambda: Checkpoint(run).step > 0 if (run / "checkpoint.safetensors").is_file() else False,
        what="the first checkpoint",
    )
    code, _, err = finish(ddpm("train", "--resume", run, "--no-progress"))
    assert code == 2 and f"in use by another ddpm process (pid {winner.pid})" in err and err.count("\n") == 1
    winner.kill()  # SIGKILL: the lock goes with the process
    winner.wait()
    step = Checkpoint(run).step
    code, _, err = finish(ddpm("train", "--resume", run, "--steps", step + 2, "--no-progress"))
    assert code == 0, err[-2000:]
    assert logged_steps(run) == list(range(1, step + 3))  # the killed run's extra rows are gone


def test_twenty_sigkills_change_nothing(idx_dir, tmp_path):
    """SIGKILL training at random moments, resume each time: the final weights equal an uninterrupted
    run's bit for bit, nothing temporary is left, metrics.jsonl has exactly one row per step, and some
    kills land inside a checkpoint write (checkpoint every step, a 2M-parameter network: ~25 MB)."""
    cfg = tiny_config(idx_dir, steps=60, checkpoint_every=1, log_every=1, sample_every=25)
    cfg.model.ch, cfg.model.num_res_blocks, cfg.model.num_groups = 64, 2, 8
    config = tmp_path / "c.json"
    config.write_text(json.dumps(cfg.to_dict()))
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert finish(ddpm("train", "--config", config, "--out", straight, "--no-progress"))[0] == 0

    rng = random.Random(0)
    kills = inside_writes = 0
    while kills < 20:
        args = (
            ["--resume", run]
            if (run / "checkpoint.safetensors").is_file()
            else ["--config", config, "--out", run]
        )
        before = len(logged_steps(run))
        process = ddpm("train", *args, "--no-progress")
        try:
            wait_for(
                lambda p=process, n=before: len(logged_steps(run)) > n or p.poll() is not None, what="a step"
            )
        except AssertionError:
            process.kill()
            raise
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is not None:
            break  # finished before the kill: too few steps left
        process.kill()
        process.wait()
        kills += 1
        inside_writes += bool(list(run.glob(".checkpoint.safetensors.*.tmp")))
    assert kills == 20, f"training finished after {kills} kills; give it more steps"
    code, _, err = finish(ddpm("train", "--resume", run, "--no-progress"))
    assert code == 0, err[-2000:]
    print(f"{kills} kills, {inside_writes} inside a checkpoint write")
    assert inside_writes >= 1, "no kill landed inside a checkpoint write"
    a, b = Checkpoint(straight), Checkpoint(run)
    for group in ("model", "ema", "optimizer"):
        for name, value in getattr(a, group).items():
            assert torch.equal(getattr(b, group)[name], value), f"{group}.{name} differs"
    assert logged_steps(run) == list(range(1, 61))
    assert not list(run.rglob("*.tmp"))
    assert (run / "samples" / "step_0000060.png").is_file()


def test_sampling_under_torchrun_gives_the_same_images(idx_dir, tmp_path):
    """Batches go round the processes, each with its generator from (seed, batch): the same samples as
    one process draws, gathered in order by rank 0."""
    config = write_config(tmp_path / "c.json", idx_dir, steps=2)
    run = tmp_path / "run"
    assert finish(ddpm("train", "--config", config, "--out", run, "--no-progress"))[0] == 0
    flags = ["--num-samples", 7, "--batch-size", 2, "--steps", 5, "--seed", 3, "--no-progress"]
    one = finish(ddpm("sample", run, *flags, "--out", tmp_path / "one"))
    two = finish(
        ddpm(
            "sample", run, *flags, "--out", tmp_path / "two", torchrun=["--standalone", "--nproc_per_node=2"]
        )
    )
    assert one[0] == 0 and two[0] == 0, two[2][-2000:]
    import numpy as np

    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("one", "two"))
    assert a.shape == (7, 8, 8, 1) and np.array_equal(a, b)
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["processes"] == 2
    assert len(two[1].strip().splitlines()) == 1  # one JSON line, from rank 0


def test_dropout_masks_per_rank_keep_resume_exact(idx_dir, tmp_path):
    """With dropout the masks come from (seed, step, rank): stopping and resuming at the same process
    count gives the straight run's weights bit for bit."""
    cfg = tiny_config(idx_dir, steps=6, checkpoint_every=3, log_every=1)
    assert cfg.model.dropout > 0
    straight, split = tmp_path / "c6.json", tmp_path / "c3.json"
    straight.write_text(json.dumps(cfg.to_dict()))
    cfg.train.steps = 3
    split.write_text(json.dumps(cfg.to_dict()))
    two = ["--standalone", "--nproc_per_node=2"]
    assert (
        finish(ddpm("train", "--config", straight, "--out", tmp_path / "a", "--no-progress", torchrun=two))[0]
        == 0
    )
    assert (
        finish(ddpm("train", "--config", split, "--out", tmp_path / "b", "--no-progress", torchrun=two))[0]
        == 0
    )
    resumed = ddpm("train", "--resume", tmp_path / "b", "--steps", 6, "--no-progress", torchrun=two)
    assert finish(resumed)[0] == 0
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for group in ("model", "ema", "optimizer"):
        for name, value in getattr(a, group).items():
            assert torch.equal(getattr(b, group)[name], value), f"{group}.{name}"


def test_two_processes_stream_shards(idx_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from ddpm.shards import make_shards

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"{i}.png")
    make_shards(images, tmp_path / "shards", shard_size=4)
    cfg = tiny_config(idx_dir, steps=4, log_every=1)
    cfg.data.dataset, cfg.data.root, cfg.data.loader_workers = "shards", str(tmp_path / "shards"), 1
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    run = tmp_path / "run"
    two = ["--standalone", "--nproc_per_node=2"]
    code, _, err = finish(
        ddpm("train", "--config", tmp_path / "c.json", "--out", run, "--no-progress", torchrun=two)
    )
    assert code == 0, err[-2000:]
    assert logged_steps(run) == [1, 2, 3, 4] and Checkpoint(run).config["data"]["channels"] == 1
