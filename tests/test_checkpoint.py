"""Checkpoint files: one safetensors file with model / EMA / optimiser tensors and JSON metadata."""

import json
import os
import random

import pytest
import torch
from safetensors.torch import save_file

from ddpm.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    load_optimizer_state,
    optimizer_tensors,
    resolved_values,
    save_checkpoint,
)
from ddpm.errors import CheckpointError

CONFIG = {"name": "tiny", "model": {"ch": 8, "ch_mult": [1, 2]}, "train": {"lr": 0.001}}


def small_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.SiLU(), torch.nn.Linear(5, 2))


def make_adam(net):
    """Adam with two parameter groups (different learning rates), so param_groups must round-trip."""
    first, second = net[0], net[2]
    return torch.optim.Adam(
        [{"params": first.parameters()}, {"params": second.parameters(), "lr": 3e-3}],
        lr=1e-2,
        betas=(0.8, 0.99),
    )


def train_steps(net, optimizer, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g)
        y = torch.randn(8, 2, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()


def metadata(**overrides):
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(CONFIG),
        "train_state": json.dumps({"step": 1}),
        "optimizer": "null",
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def write_raw(path, tensors=None, meta=None):
    """A safetensors file written directly, for the error cases."""
    if tensors is None:
        tensors = {"model.w": torch.ones(2, 2)}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_round_trip_of_tensors_and_metadata(tmp_path):
    net = small_net()
    optimizer = make_adam(net)
    train_steps(net, optimizer, 3, seed=1)
    model = net.state_dict()
    ema = {k: v * 0.5 + 1 for k, v in model.items()}
    ema["extra_int_buffer"] = torch.arange(4, dtype=torch.int64)
    ema["half"] = torch.randn(3, 2).to(torch.bfloat16)
    train_state = {"step": 3, "best": [1.5, None], "nested": {"a": "b"}}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, CONFIG, model, ema=ema, optimizer=optimizer, train_state=train_state)

    ckpt = Checkpoint(path)
    assert ckpt.path == path
    assert ckpt.config == CONFIG
    assert ckpt.train_state == train_state
    assert set(ckpt.model) == set(model) and set(ckpt.ema) == set(ema)
    for k, v in model.items():
        assert torch.equal(ckpt.model[k], v)
    for k, v in ema.items():
        assert ckpt.ema[k].dtype == v.dtype and torch.equal(ckpt.ema[k], v)
    optim_saved, meta_saved = optimizer_tensors(optimizer)
    assert set(ckpt.optimizer) == set(optim_saved) and optim_saved
    for k, v in optim_saved.items():
        assert torch.equal(ckpt.optimizer[k], v)
    assert [g["lr"] for g in ckpt.optimizer_meta["param_groups"]] == [1e-2, 3e-3]
    assert ckpt.optimizer_meta["scalars"] == meta_saved["scalars"]


def test_restored_adam_takes_the_identical_next_steps(tmp_path):
    net = small_net()
    optimizer = make_adam(net)
    train_steps(net, optimizer, 4, seed=1)
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, net.state_dict(), optimizer=optimizer)

    ckpt = Checkpoint(tmp_path)
    restored = small_net(seed=123)  # different initial weights: all state must come from the file
    restored.load_state_dict(ckpt.weights(use_ema=False))
    restored_optimizer = make_adam(restored)
    load_optimizer_state(restored_optimizer, ckpt.optimizer, ckpt.optimizer_meta)

    train_steps(net, optimizer, 3, seed=2)
    train_steps(restored, restored_optimizer, 3, seed=2)
    for a, b in zip(net.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)
    # A fresh optimiser (no restored moments) would have diverged: the check above has teeth.
    fresh = small_net(seed=123)
    fresh.load_state_dict(ckpt.weights(use_ema=False))
    train_steps(fresh, make_adam(fresh), 3, seed=2)
    assert not torch.equal(fresh[0].weight, net[0].weight)


def test_optimizer_tensors_splits_tensors_from_plain_values(tmp_path):
    net = small_net()
    optimizer = make_adam(net)
    train_steps(net, optimizer, 1, seed=0)
    optimizer.state[net[0].weight]["custom_count"] = 7  # a non-tensor state entry
    tensors, meta = optimizer_tensors(optimizer)
    assert "0.exp_avg" in tensors and "0.exp_avg_sq" in tensors
    assert all(torch.is_tensor(v) for v in tensors.values())
    assert meta["scalars"] == {"0.custom_count": 7}
    assert len(meta["param_groups"]) == 2
    json.dumps(meta)  # must be storable as JSON metadata

    save_checkpoint(tmp_path / "c.safetensors", CONFIG, net.state_dict(), optimizer=optimizer)
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    other = small_net()
    other_optimizer = make_adam(other)
    load_optimizer_state(other_optimizer, ckpt.optimizer, ckpt.optimizer_meta)
    state = other_optimizer.state_dict()["state"]
    assert state[0]["custom_count"] == 7
    assert torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_without_optimizer_or_ema(tmp_path):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, {"w": torch.ones(3)})
    ckpt = Checkpoint(tmp_path)
    assert ckpt.optimizer == {} and ckpt.optimizer_meta is None
    assert ckpt.ema == {} and ckpt.train_state == {}


def test_directory_resolves_to_the_checkpoint_file_inside(tmp_path):
    save_checkpoint(tmp_path / "run" / CHECKPOINT_NAME, CONFIG, {"w": torch.ones(3)})  # creates run/
    ckpt = Checkpoint(tmp_path / "run")
    assert ckpt.path == tmp_path / "run" / CHECKPOINT_NAME
    assert torch.equal(ckpt.model["w"], torch.ones(3))
    ckpt = Checkpoint(str(tmp_path / "run"))  # str paths too
    assert ckpt.path == tmp_path / "run" / CHECKPOINT_NAME


def test_weights_choose_ema_or_model(tmp_path):
    model, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, model, ema=ema)
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.weights()["w"], ema["w"])  # EMA is the default
    assert torch.equal(ckpt.weights(use_ema=True)["w"], ema["w"])
    assert torch.equal(ckpt.weights(use_ema=False)["w"], model["w"])


def test_model_is_ema_serves_the_model_weights_as_ema(tmp_path):
    model = {"w": torch.full((2,), 3.0)}
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, model, train_state={"model_is_ema": True})
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.weights(use_ema=True)["w"], model["w"])
    assert torch.equal(ckpt.weights(use_ema=False)["w"], model["w"])


def test_model_is_ema_does_not_hide_real_ema_weights(tmp_path):
    model, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, model, ema=ema, train_state={"model_is_ema": True})
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.weights(use_ema=True)["w"], ema["w"])
    assert torch.equal(ckpt.weights(use_ema=False)["w"], model["w"])


@pytest.mark.parametrize("train_state", [None, {"step": 5}, {"model_is_ema": False}])
def test_ema_requested_but_absent(tmp_path, train_state):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, {"w": torch.ones(2)}, train_state=train_state)
    ckpt = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"has no EMA weights: use its raw weights \(use_ema\)") as e:
        ckpt.weights(use_ema=True)
    assert e.value.field == "use_ema"  # the CLI says --no-ema
    assert torch.equal(ckpt.weights(use_ema=False)["w"], torch.ones(2))


def test_saving_again_replaces_the_checkpoint_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, CONFIG, {"w": torch.zeros(2)}, train_state={"step": 1})
    save_checkpoint(path, CONFIG, {"w": torch.ones(2)}, train_state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert not list(tmp_path.glob(".*.tmp"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.train_state == {"step": 2} and torch.equal(ckpt.model["w"], torch.ones(2))


def test_checkpoint_file_gets_the_usual_permissions(tmp_path):
    save_checkpoint(tmp_path / CHECKPOINT_NAME, CONFIG, {"w": torch.ones(2)})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / CHECKPOINT_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, CONFIG, {"w": torch.zeros(2)}, train_state={"step": 1})
    shared = torch.ones(4)
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors refuses shared storage
        save_checkpoint(path, CONFIG, {"a": shared, "b": shared}, train_state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    ckpt = Checkpoint(tmp_path)
    assert ckpt.train_state == {"step": 1} and torch.equal(ckpt.model["w"], torch.zeros(2))


# ---- error paths: each a CheckpointError naming the problem ----


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*nothing.safetensors"):
        Checkpoint(tmp_path / "nothing.safetensors")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint at .*{CHECKPOINT_NAME}"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", random.Random(0).randbytes(1000), b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}", b"plain text"],
    ids=["empty", "random", "bad-header", "text"],
)
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is damaged or not a safetensors file"):
        Checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, CONFIG, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is damaged or not a safetensors file"):
        Checkpoint(path)


@pytest.mark.parametrize(
    "meta", [None, {"config": "{}"}, {"format": "something-else", "format_version": "1"}]
)
def test_safetensors_without_the_format_tag(tmp_path, meta):
    path = write_raw(tmp_path / "other.safetensors", meta=meta)
    with pytest.raises(CheckpointError, match=f"is not a ddpm checkpoint \\(no '{FORMAT}' format tag\\)"):
        Checkpoint(path)


@pytest.mark.parametrize("version", ["2", "0", "1.0", None])
def test_wrong_format_version(tmp_path, version):
    path = write_raw(tmp_path / CHECKPOINT_NAME, meta=metadata(format_version=version))
    with pytest.raises(
        CheckpointError, match=f"has format version {version}; this ddpm reads version {FORMAT_VERSION}"
    ):
        Checkpoint(path)


@pytest.mark.parametrize(
    "field,value",
    [
        ("config", "{not json"),
        ("train_state", "[1, 2"),
        ("optimizer", "nul"),
        ("config", None),
        ("request", "[1]"),
        ("request", "{not json"),
    ],
)
def test_damaged_json_metadata(tmp_path, field, value):
    path = write_raw(tmp_path / CHECKPOINT_NAME, meta=metadata(**{field: value}))
    with pytest.raises(CheckpointError, match="has damaged metadata"):
        Checkpoint(path)


def test_valid_raw_file_loads(tmp_path):
    """The raw writer used above builds valid checkpoints when nothing is broken (the control case)."""
    path = write_raw(tmp_path / CHECKPOINT_NAME, meta=metadata())
    ckpt = Checkpoint(path)
    assert ckpt.config == CONFIG and ckpt.train_state == {"step": 1}
    assert ckpt.request == CONFIG and ckpt.resolved == {}  # (written before the resolved record)
    assert torch.equal(ckpt.model["w"], torch.ones(2, 2))


def test_the_request_is_recorded_beside_the_config_and_the_difference_is_what_was_resolved(tmp_path):
    request = {**CONFIG, "data": {"channels": None}}
    config = {**CONFIG, "model": {"ch": 16, "ch_mult": [1, 2]}, "data": {"channels": 1}}
    save_checkpoint(tmp_path / CHECKPOINT_NAME, config, {"w": torch.ones(3)}, request=request)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.config == config and ckpt.request == request
    assert ckpt.resolved == resolved_values(config, request) == {"model.ch": 16, "data.channels": 1}


@pytest.mark.parametrize("name", ["extra.w", "weights", "Model.w", "emaw"])
def test_unexpected_tensor_group(tmp_path, name):
    tensors = {"model.w": torch.ones(2), name: torch.zeros(2)}
    path = write_raw(tmp_path / CHECKPOINT_NAME, tensors, meta=metadata())
    with pytest.raises(CheckpointError, match=f"holds an unexpected tensor '{name}'"):
        Checkpoint(path)


@pytest.mark.parametrize("tensors", [{"ema.w": torch.ones(2)}, {"optim.0.exp_avg": torch.ones(2)}, {}])
def test_no_model_weights(tmp_path, tensors):
    path = write_raw(tmp_path / CHECKPOINT_NAME, tensors, meta=metadata())
    with pytest.raises(CheckpointError, match="holds no model weights"):
        Checkpoint(path)


def test_damaged_and_mismatched_checkpoints_are_reported(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"name": "x"}, {"w": torch.ones(3)})
    assert Checkpoint(path).model["w"].sum() == 3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        Checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpoint(tmp_path / "missing")

    from safetensors.torch import save_file

    save_file(
        {"model.w": torch.ones(1)}, str(path), metadata={"format": "ddpm-checkpoint", "format_version": "99"}
    )
    with pytest.raises(CheckpointError, match="format version 99"):
        Checkpoint(path)
    save_file({"w": torch.ones(1)}, str(path))
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        Checkpoint(path)


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {}, {"w": torch.ones(2)})

    import ddpm.checkpoint as ck

    def crash(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {}, {"w": torch.zeros(2)})
    assert torch.equal(Checkpoint(path).model["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"config": "[1, 2]"}, "config, request and train_state must be objects"),
        ({"train_state": '"done"'}, "config, request and train_state must be objects"),
        ({"optimizer": "3"}, "optimizer must be an object"),
        ({"train_state": '{"step": "12"}'}, "step '12' is not a count"),
        ({"train_state": '{"step": -1}'}, "step -1 is not a count"),
        ({"train_state": '{"step": 2.5}'}, "step 2.5 is not a count"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused(tmp_path, meta, message):
    write_raw(tmp_path / "c.safetensors", meta=metadata(**meta))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(tmp_path / "c.safetensors")
