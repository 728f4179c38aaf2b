"""`ddpm eval fid` (ddpm.evaluate): which samples, how many, which extractor, and what is written."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from ddpm.cli import main
from ddpm.errors import DataError
from ddpm.evaluate import evaluate_fid
from ddpm.sample import SampleOptions
from ddpm.train import Trainer


def test_evaluate_fid_samples_a_checkpoint_first(idx_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    options = SampleOptions(steps=5, seed=4, sampler="ddim", batch_size=3)
    path, result = evaluate_fid(
        run, num=7, sampling=options, data_dir=str(idx_dir), cache_dir=str(tmp_path / "c"), progress=False
    )
    (folder,) = run.glob("fid-samples-7-*")
    assert path == folder / "fid-domain-fashion-mnist-cnn-v1-test.json"
    assert json.loads(path.read_text()) == result
    assert result["num_samples"] == 7 and result["samples"] == str(folder)
    assert result["reference"] == {"dataset": "fashion-mnist", "split": "test", "num_images": 10}
    made = result["sampling"]
    assert (made["sampler"], made["steps"], made["seed"], made["num_samples"]) == ("ddim", 5, 4, 7)
    assert np.load(folder / "samples.npz")["arr_0"].shape == (7, 8, 8, 1)
    assert "warning" not in result  # the published count is only known for cifar10
    assert result["screening"] is True  # 7 < 5,000: not a count to compare settings at
    assert result["real_floor"]["num_images"] == 7 and result["real_floor"]["split"] == "train"
    assert "50 bootstrap resamples" in result["fid_interval_method"]
    # the same samples scored again from their folder give the same numbers
    _, again = evaluate_fid(folder, data_dir=str(idx_dir), cache_dir=str(tmp_path / "c"), progress=False)
    assert again["fid"] == result["fid"] and again["kid"] == result["kid"]


def test_eval_fid_cli_writes_labelled_json(idx_dir, tmp_path, capsys):
    from ddpm.data import load_idx_dataset

    images = load_idx_dataset("fashion-mnist", str(idx_dir), "test").permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=images)
    (tmp_path / "samples.json").write_text(json.dumps({"seed": 3, "steps": 100}))
    argv = [
        "eval",
        "fid",
        str(tmp_path / "samples.npz"),
        "--data-dir",
        str(idx_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    result = json.loads(open(out["out"]).read())
    assert result["num_samples"] == 10 and result["sampling"] == {"seed": 3, "steps": 100}
    assert result["extractor"].startswith("domain-") and result["reference"]["dataset"] == "fashion-mnist"
    assert main(["eval", "fid", str(tmp_path / "missing.npz")]) == 2
    assert main([*argv, "--resamples", "20", "--out", str(tmp_path / "r.json")]) == 0
    assert "over 20 bootstrap" in json.loads((tmp_path / "r.json").read_text())["fid_interval_method"]
    assert main([*argv, "--resamples", "1"]) == 2  # (argparse: at least 2)


def test_eval_fid_on_a_cifar10_checkpoint_draws_50000_samples_by_default(tmp_path, monkeypatch):
    from ddpm import evaluate
    from ddpm.build import build_model
    from ddpm.checkpoint import save_checkpoint
    from ddpm.presets import preset

    cfg = preset("cifar10")
    cfg.model.ch, cfg.model.ch_mult, cfg.model.num_res_blocks, cfg.model.attn_resolutions = 8, (1,), 1, ()
    cfg.model.num_groups = 4
    weights = build_model(cfg, 3).state_dict()
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", cfg.to_dict(), weights)
    seen = {}

    def fake_sample(checkpoint, out, options, num, progress):
        seen["num"] = num
        raise DataError("stop here")

    monkeypatch.setattr(evaluate, "sample_to_dir", fake_sample)
    assert main(["eval", "fid", str(tmp_path / "run")]) == 2
    assert seen["num"] == 50_000
    assert main(["eval", "fid", str(tmp_path / "run"), "--num", "7"]) == 2
    assert seen["num"] == 7
    assert main(["eval", "fid", str(tmp_path / "run"), "--num", "0"]) == 2
    assert seen["num"] == 7  # refused by the parser: not replaced by the default and sampled


def test_eval_fid_on_a_missing_source_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 28, 28, 1), np.uint8))  # must not be picked up
    assert main(["eval", "fid", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_eval_fid_of_a_class_conditional_run_reports_class_agreement(class_run, tmp_path, capsys):
    import shutil

    run, data = class_run
    run = shutil.copytree(run, tmp_path / "run")
    argv = ["eval", "fid", str(run), "--num", "20", "--steps", "3", "--guidance", "1"]
    assert main([*argv, "--data-dir", str(data), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    result = json.loads(open(json.loads(capsys.readouterr().out)["out"]).read())
    agreement = result["class_agreement"]
    per_class = agreement["per_class"]
    assert list(per_class) == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]  # class-balanced: every class, 2 each
    assert all(v["samples"] == 2 for v in per_class.values())
    overall = sum(v["agreement"] * v["samples"] for v in per_class.values()) / 20
    assert agreement["overall"] == pytest.approx(overall, abs=1e-4)
    assert result["sampling"]["classes"] == "balanced" and result["sampling"]["guidance"] == 1.0
    # the labels are kept with the samples: scoring their folder again gives the same agreement
    _, again = evaluate_fid(
        result["samples"], data_dir=str(data), cache_dir=str(tmp_path / "c"), progress=False
    )
    assert again["class_agreement"] == agreement


def test_eval_fid_reuses_the_samples_of_the_same_settings_only(idx_dir, tmp_path):
    """RUN/fid-samples-N-KEY: the same checkpoint and settings reuse the samples; another sampler or
    seed at the same N draws its own (they once shared fid-samples-N); a later checkpoint's evaluation
    removes the earlier checkpoint's folders and a killed evaluation's leftovers, but no other folder."""
    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()

    def fid(**options):
        sampling = SampleOptions(steps=3, batch_size=5, **options)
        kw = dict(num=5, data_dir=str(idx_dir), cache_dir=str(tmp_path / "c"), progress=False)
        return evaluate_fid(run, sampling=sampling, **kw)[1]

    first = fid(sampler="ddim", seed=1)
    folder = Path(first["samples"])
    made = (folder / "samples.json").stat().st_mtime_ns
    again = fid(sampler="ddim", seed=1)
    assert again["samples"] == str(folder) and (folder / "samples.json").stat().st_mtime_ns == made
    assert again["fid"] == first["fid"]
    other = fid(sampler="ddim", seed=2)
    assert other["samples"] != str(folder) and other["fid"] != first["fid"]
    assert Path(first["samples"]).is_dir()  # the first setting's samples are kept beside

    killed = run / "fid-samples-5-killed"  # what a SIGKILL during sampling leaves
    (killed / ".partial-x1" / "images").mkdir(parents=True)
    theirs = run / "fid-samples-mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    Trainer(tiny_config(idx_dir, steps=4), run, resume=True, progress=False).train()
    later = fid(sampler="ddim", seed=1)
    assert later["sampling"]["step"] == 4 and later["samples"] != str(folder)
    assert sorted(p.name for p in run.glob("fid-samples-*")) == sorted(
        [Path(later["samples"]).name, theirs.name]
    )
