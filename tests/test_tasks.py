"""The training tasks: what differs per kind of model behind one protocol, and a run that ends the same
from the CLI and from ``Trainer(...).train()``."""

import json
import re

import pytest
import torch
from conftest import make_idx_dir, tiny_config
from test_clip import TINY_RUN, bars_dir

from ddpm.checkpoint import Checkpoint
from ddpm.cli import main
from ddpm.config import with_kind
from ddpm.presets import resolve_config
from ddpm.rng import step_generator
from ddpm.tasks import Batch
from ddpm.train import Trainer


def test_a_batch_splits_into_micro_batches_field_by_field():
    x, cond = torch.arange(8.0).reshape(4, 2), torch.tensor([3, 1, 4, 1])
    parts = Batch(x, cond=cond).chunk(2)
    assert [p.x.tolist() for p in parts] == [x[:2].tolist(), x[2:].tolist()]
    assert [p.cond.tolist() for p in parts] == [[3, 1], [4, 1]] and parts[1].t is None


def configs(tmp_path):
    data = make_idx_dir(tmp_path / "idx")
    diffusion = tiny_config(data, steps=2)
    diffusion.data.labels = "classes"
    autoencoder = tiny_config(data, steps=2)
    autoencoder.model = with_kind(autoencoder.model, "autoencoder")
    autoencoder.model.latent_channels = 2
    bars = bars_dir(tmp_path / "bars", n_train=40, n_test=10)
    values = {"data.root": str(bars), "data.image_size": 8, "train.batch_size": 8, "train.steps": 2}
    text_encoder = resolve_config(None, "fashion-mnist-text-encoder", None, values, TINY_RUN)
    return {"train": diffusion, "train-autoencoder": autoencoder, "train-text-encoder": text_encoder}


FINISHED_BY = {"train": set(), "train-autoencoder": {"reconstruction.json"}}
TIMES = ("train_seconds", "seconds")  # wall-clock, differ between any two runs


@pytest.mark.parametrize("command", ["train", "train-autoencoder", "train-text-encoder"])
def test_every_training_command_ends_the_same_from_the_cli_and_from_the_api(command, tmp_path, capsys):
    cfg = configs(tmp_path)[command]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    cache = str(tmp_path / "cache")
    argv = [command, "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--cache-dir", cache, "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = Trainer(cfg, tmp_path / "api", progress=False, cache_dir=cache).train()

    def files(run):  # (TensorBoard names its event files by time, host, pid and a counter)
        names = (p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
        return sorted(re.sub(r"events\.out\.tfevents\..*", "EVENTS", name) for name in names)

    assert files(tmp_path / "cli") == files(tmp_path / "api")
    finished = FINISHED_BY.get(command, {"text-encoder.json", "model.safetensors"})
    assert finished <= set(files(tmp_path / "api"))
    printed.pop("run_dir")

    def same(record, run):  # (the finish's report names its run)
        kept = {k: v for k, v in record.items() if k not in TIMES}
        return json.loads(json.dumps(kept).replace(str(tmp_path / run), "RUN"))

    assert same(printed, "cli") == same(result, "api")
    cli, api = Checkpoint(tmp_path / "cli"), Checkpoint(tmp_path / "api")
    assert all(torch.equal(cli.ema[k], api.ema[k]) for k in api.ema)


def test_what_a_run_resolves_is_recorded_apart_from_what_was_asked(tmp_path, capsys):
    cfg = configs(tmp_path)["train"]
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.cfg.model.num_classes == 10 and trainer.cfg.data.channels == 1
    assert cfg.model.num_classes == 0 and cfg.data.channels is None and cfg.data.class_names == ()
    # the class labels' condition dropout: the null class is id num_classes
    batch = trainer.task.batch(0, step_generator(0, 0))
    assert batch.cond.shape == (4,) and int(batch.cond.max()) <= 10
    trainer.train()
    ckpt = Checkpoint(tmp_path / "run")
    assert ckpt.request == json.loads(json.dumps(cfg.to_dict()))
    names = list(trainer.task.examples.dataset.class_names)
    assert ckpt.resolved == {"data.channels": 1, "data.class_names": names, "model.num_classes": 10}
    assert ckpt.config["model"]["num_classes"] == 10 and ckpt.config["data"]["class_names"] == names
    # a resumed run starts from the request again and resolves the same values
    argv = ["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress"]
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["step"] == 3
    resumed = Checkpoint(tmp_path / "run")
    assert resumed.request["train"]["steps"] == 3 and resumed.request["model"]["num_classes"] == 0
    assert resumed.resolved == ckpt.resolved


def test_a_run_whose_request_named_its_classes_resumes_from_the_command_line(tmp_path, capsys):
    cfg = configs(tmp_path)["train"]
    cfg.model.num_classes = 10  # asked for, not resolved: the class names still are
    Trainer(cfg, tmp_path / "run", progress=False).train()
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert list(Checkpoint(tmp_path / "run").resolved) == ["data.channels", "data.class_names"]
