"""Hostile arguments (issue 21): each is refused with one line that names the real problem, exit 2, no
traceback and nothing written, by the library as by the command line; or, where the request is fine but
loses something, run with a warning that says what."""

import json

import numpy as np
import pytest
import torch
from conftest import make_idx_dir, text_config, tiny_config

import ddpm
from ddpm.checkpoint import Checkpoint, save_checkpoint
from ddpm.cli import main
from ddpm.conditions import class_index
from ddpm.config import Config
from ddpm.train import Trainer

FAST = ["--num", "2", "--steps", "2", "--no-progress"]


def refused(capsys, argv, out, *words):
    """``argv`` (given ``--out out`` unless it names ``out`` itself) exits 2 with one line on stderr
    holding every one of ``words``, and writes nothing."""
    capsys.readouterr()
    assert main(argv if str(out) in argv else [*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ddpm: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not out.exists()
    return err


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A text generator at 4x4, a super-resolution stage 4 -> 8, a pipeline of the two, and a
    `ddpm train-text-encoder` run (2 steps)."""
    base = tmp_path_factory.mktemp("hostile")
    data = make_idx_dir(base / "idx")
    torch.manual_seed(0)
    encoder = ["model.text_width=32", "model.text_layers=1", "model.text_heads=2", "model.text_max_length=40"]
    encoder += ["model.embed_dim=32", "model.image_width=8", "train.batch_size=8", "train.log_every=1"]
    argv = ["train-text-encoder", "--data-dir", str(data), "--image-size", "8", "--steps", "2"]
    argv += ["--device", "cpu", "--out", str(base / "encoder"), "--no-progress"]
    assert main([*argv, *[a for s in encoder for a in ("--set", s)]]) == 0
    cfg = text_config(data, base / "encoder", steps=2)
    cfg.data.image_size = 4
    Trainer(cfg, base / "text-4", progress=False).train()
    cfg = tiny_config(data, steps=2)
    cfg.model.low_res, cfg.model.low_res_noise_max, cfg.model.low_res_noise = 4, 20, 5
    Trainer(cfg, base / "sr-4-8", progress=False).train()
    pipe = base / "pipe"
    assert (
        main(["pipeline", str(pipe), "--generator", str(base / "text-4"), "--decoder", str(base / "sr-4-8")])
        == 0
    )
    return base


# ---- A. silent wrong results ----


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--sampler", "ddim", "--eta", "1e308"], ["ddim sampler's eta must be at most 1", "1e+308"]),
        (["--sampler", "ddim", "--eta", "1.01"], ["ddim sampler's eta must be at most 1"]),
        (["--sampler", "sde-dpm++2m", "--eta", "1e308"], ["sde-dpm++2m sampler's eta must be at most 10"]),
        (["--class", "1", "--guidance", "1e308"], ["--guidance must be", "at most 100", "1e+308"]),
        (["--class", "1", "--guidance", "inf"], ["--guidance must be a finite number"]),
        (["--guidance-rescale", "1.5"], ["--guidance-rescale must be in [0, 1]"]),
        (["--guidance-interval", "10", "5"], ["--guidance-interval must be (lo, hi) with 0 <= lo <= hi < 5"]),
        (["--guidance-interval", "-1", "5"], ["--guidance-interval must be (lo, hi)"]),
    ],
)
def test_out_of_range_sampling_numbers_are_refused(class_run, tmp_path, capsys, flags, words):
    run, _ = class_run
    refused(capsys, ["sample", str(run), *FAST, *flags], tmp_path / "out", *words)


def test_the_library_refuses_them_too(class_run, tmp_path):
    run, _ = class_run
    for options, message in (
        (dict(sampler="ddim", eta=1e308), "eta must be at most 1"),
        (dict(guidance=1e308, class_name=1), "at most 100"),
        (dict(seed=-1), "^seed must be an integer in 0..2\\*\\*63-1"),
        (dict(num=10**12), "of memory"),
    ):
        with pytest.raises(ddpm.ConfigError, match=message):
            ddpm.sample_to_dir(run, tmp_path / "out", steps=2, progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_the_sde_solvers_still_take_an_eta_above_one(class_run, tmp_path):
    run, _ = class_run
    info = ddpm.sample_to_dir(
        run, tmp_path / "out", num=2, steps=2, sampler="sde-dpm++2m", eta=3.0, progress=False
    )
    assert info["eta"] == 3.0


def test_low_res_noise_must_be_a_level_of_the_stage_schedule(parts, tmp_path, capsys):
    low = tmp_path / "low"
    assert main(["sample", str(parts / "text-4"), *FAST, "--out", str(low)]) == 0
    stage = ["sample", str(parts / "sr-4-8"), *FAST, "--low-res", str(low)]
    refused(
        capsys, [*stage, "--low-res-noise", "51"], tmp_path / "out", "--low-res-noise", "must be in 0..50"
    )
    refused(
        capsys,
        [*stage, "--low-res-noise", "-1"],
        tmp_path / "out",
        "--low-res-noise must be a noise level >= 0",
    )
    generate = ["generate", str(parts / "pipe"), "--num", "2", "--no-progress", "--low-res-noise", "51"]
    refused(capsys, generate, tmp_path / "out", "must be in 0..50")


def test_more_prompts_than_samples_are_refused_not_dropped(parts, tmp_path, capsys):
    prompts = ["--prompt", "a coat", "--prompt", "a bag", "--prompt", "a shoe"]
    words = ("--num 2 is fewer than the 3 prompts", "at least 3")
    refused(capsys, ["sample", str(parts / "text-4"), *FAST, *prompts], tmp_path / "out", *words)
    refused(
        capsys,
        ["generate", str(parts / "pipe"), *prompts, "--num", "2", "--no-progress"],
        tmp_path / "out",
        *words,
    )
    with pytest.raises(ddpm.ConfigError, match="fewer than the 3 prompts"):
        ddpm.Pipeline.load(parts / "pipe").prepare(prompts=["a coat", "a bag", "a shoe"], num=2)
    # eval text draws per_prompt samples for each prompt: never fewer than the prompts
    assert (
        main(
            [
                "sample",
                str(parts / "text-4"),
                *prompts,
                "--num",
                "3",
                "--steps",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "three"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "three" / "samples.json").read_text())["prompts"] == [
        "a coat",
        "a bag",
        "a shoe",
    ]


def test_a_prompt_longer_than_the_context_is_sampled_with_a_warning_naming_it(parts, tmp_path, capsys):
    long_a, long_b = "a coat " * 30 + "that is dark", "a coat " * 30 + "that is light"
    argv = ["sample", str(parts / "text-4"), "--num", "2", "--steps", "2", "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--prompt", long_a, "--prompt", long_b, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("ddpm: warning: --prompt 'a coat a coat") for line in err)
    assert all("context is 40" in line and "cut" in line for line in err)
    made = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert made["prompts"] == [long_a, long_b]  # the record keeps the whole texts, and says they were cut
    assert made["prompts_cut_to_context"] == {"tokens": 40, "prompts": [long_a, long_b]}
    # a prompt that fits says nothing
    assert main([*argv, "--prompt", "a dark coat", "--out", str(tmp_path / "short")]) == 0
    assert capsys.readouterr().err == ""
    assert "prompts_cut_to_context" not in json.loads((tmp_path / "short" / "samples.json").read_text())


# ---- B. tracebacks ----


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_outside_0_to_2_63_is_refused(class_run, parts, idx_dir, tmp_path, capsys, seed):
    run, _ = class_run
    words = ("--seed must be an integer in 0..2**63-1", seed)
    refused(capsys, ["sample", str(run), *FAST, "--seed", seed], tmp_path / "out", *words)
    refused(
        capsys,
        ["generate", str(parts / "pipe"), "--num", "2", "--no-progress", "--seed", seed],
        tmp_path / "out",
        *words,
    )
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(idx_dir).to_dict()))
    refused(
        capsys,
        ["train", "--config", str(config), "--seed", seed, "--no-progress"],
        tmp_path / "out",
        "train.seed",
        seed,
    )


def test_a_prompt_that_is_not_utf8_is_refused_naming_the_flag(parts, tmp_path, capsys):
    bad = b"caf\xff".decode("utf-8", "surrogateescape")  # what Python makes of such a command-line argument
    words = ("--prompt is not valid UTF-8 text (byte 0xff at character 4)",)
    refused(capsys, ["sample", str(parts / "text-4"), *FAST, "--prompt", bad], tmp_path / "out", *words)
    refused(
        capsys,
        ["generate", str(parts / "pipe"), "--num", "2", "--no-progress", "--prompt", bad],
        tmp_path / "out",
        *words,
    )
    negative = ["sample", str(parts / "text-4"), *FAST, "--negative-prompt", bad]
    refused(capsys, negative, tmp_path / "out", "--negative-prompt is not valid UTF-8")


def test_counts_that_cannot_fit_in_memory_fail_at_once(class_run, parts, tmp_path, capsys):
    run, _ = class_run
    num = str(10**12)
    refused(
        capsys,
        ["sample", str(run), "--num", num, "--no-progress"],
        tmp_path / "out",
        f"--num {num}",
        "of memory",
    )
    prompt = ["--prompt", "a coat"]
    generate = ["generate", str(parts / "pipe"), "--num", num, "--no-progress", *prompt]
    refused(capsys, generate, tmp_path / "out", f"--num {num}", "of memory")


def test_text_conditions_are_looked_up_per_batch_not_copied_per_sample(parts, tmp_path):
    from ddpm.conditioning import PerSample
    from ddpm.sample import SampleOptions, prepare

    request = prepare(
        parts / "text-4", SampleOptions(num=6, prompts=("a coat", "a bag"), steps=2, progress=False)
    )
    assert isinstance(request.cond, PerSample) and len(request.cond) == 6
    assert len(request.cond.table) == 2  # an encoding per prompt, not per sample
    assert request.cond[2:5].tokens.shape[0] == 3


# ---- C. misleading messages ----


def test_a_text_encoder_run_as_the_generator_is_named_as_such(parts, tmp_path, capsys):
    out = tmp_path / "pipe"
    for encoder in (parts / "encoder", parts / "text-4" / "text-encoder"):  # the run, and a run's copy
        argv = ["pipeline", str(out), "--generator", str(encoder), "--decoder", str(parts / "sr-4-8")]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a text encoder run" in err and "--text-encoder" in err and "upsamples" not in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_checkpoint_whose_config_lacks_a_section_says_so(class_run, tmp_path, capsys):
    run, _ = class_run
    broken = tmp_path / "broken"
    ckpt = Checkpoint(run)
    config = {k: v for k, v in ckpt.config.items() if k != "model"}
    save_checkpoint(
        broken / "checkpoint.safetensors", config, ckpt.model, ckpt.ema, train_state=ckpt.train_state
    )
    words = ("its config is incomplete (no model section)",)
    err = refused(capsys, ["sample", str(broken), *FAST], tmp_path / "out", *words)
    assert "multiple of" not in err
    refused(capsys, ["eval", "fid", str(broken), "--num", "2", "--no-progress"], tmp_path / "out", *words)
    pipe = ["pipeline", str(tmp_path / "out"), "--generator", str(broken), "--decoder", str(run)]
    refused(capsys, pipe, tmp_path / "out", *words)


def test_eval_fid_checks_the_dataset_name_first(tmp_path, capsys):
    words = ("unknown dataset 'imagenet'", "fashion-mnist, mnist, cifar10, folder, shards")
    source = tmp_path / "samples"
    source.mkdir()
    np.savez(source / "samples.npz", np.zeros((2, 8, 8, 1), np.uint8))
    argv = ["eval", "fid", str(source), "--dataset", "imagenet", "--extractor", "inception"]
    refused(capsys, [*argv, "--cache-dir", str(tmp_path / "cache")], tmp_path / "out.json", *words)
    assert not (tmp_path / "cache").exists()
    # even before the source is looked at
    refused(
        capsys, ["eval", "fid", str(tmp_path / "none"), "--dataset", "imagenet"], tmp_path / "o.json", *words
    )


def test_a_class_name_matches_ignoring_case_where_that_is_unambiguous(class_run, tmp_path, capsys):
    run, _ = class_run
    assert main(["sample", str(run), *FAST, "--class", "trouser", "--out", str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "samples.npz")["labels"].tolist() == [1, 1]
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["classes"] == 1
    cfg = Config()
    cfg.data.class_names, cfg.model.num_classes = ("cat", "Cat", "dog"), 3
    assert class_index(cfg, "Cat") == 1 and class_index(cfg, "DOG") == 2
    with pytest.raises(ddpm.ConfigError, match="ambiguous ignoring case"):
        class_index(cfg, "CAT")


def test_a_text_preset_before_its_encoder_is_trained_names_the_command(
    idx_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a new clone: no runs/ yet
    argv = ["train", "--preset", "fashion-mnist-text", "--data-dir", str(idx_dir), "--device", "cpu"]
    words = (
        "text encoder runs/text-encoder does not exist",
        "ddpm train-text-encoder --out runs/text-encoder",
    )
    refused(capsys, [*argv, "--no-progress"], tmp_path / "runs" / "fashion-mnist-text", *words)
    assert not (tmp_path / "runs").exists()


def test_a_latent_preset_before_its_autoencoder_is_trained_names_the_command(
    idx_dir, tmp_path, capsys, monkeypatch, parts
):
    monkeypatch.chdir(tmp_path)  # a text encoder is there, the autoencoder not yet
    argv = ["train", "--preset", "fashion-mnist-latent-text", "--data-dir", str(idx_dir), "--device", "cpu"]
    argv += ["--set", f"model.text_encoder={parts / 'encoder'}", "--no-progress"]
    words = ("autoencoder runs/autoencoder does not exist", "ddpm train-autoencoder --out runs/autoencoder")
    refused(capsys, argv, tmp_path / "runs" / "fashion-mnist-latent-text", *words)
    assert not (tmp_path / "runs").exists()


def test_eval_fid_checks_the_inception_weights_before_sampling(class_run, tmp_path, capsys):
    run, _ = class_run
    argv = ["eval", "fid", str(run), "--extractor", "inception", "--num", "2", "--no-progress"]
    argv += ["--inception-weights", str(tmp_path / "missing.pth")]
    refused(capsys, argv, tmp_path / "fid.json", "--inception-weights: no file at")
    assert not list(run.glob("fid-samples-*"))  # refused before it sampled
