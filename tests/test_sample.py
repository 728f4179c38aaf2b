import pytest
import torch
from conftest import tiny_config

import ddpm


def test_sample_cli_with_ddim(idx_dir, tmp_path):
    import json

    import numpy as np
    from conftest import tiny_config

    from ddpm.cli import main
    from ddpm.train import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    outs = []
    for name, seed in (("a", "0"), ("b", "0")):
        argv = [
            "sample",
            str(run),
            "--num",
            "3",
            "--steps",
            "5",
            "--sampler",
            "ddim",
            "--spacing",
            "trailing",
            "--seed",
            seed,
            "--out",
            str(tmp_path / name),
            "--no-progress",
        ]
        assert main(argv) == 0
        outs.append(np.load(tmp_path / name / "samples.npz")["arr_0"])
    assert np.array_equal(outs[0], outs[1])
    info = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert info["sampler"] == "ddim" and info["eta"] == 0.0 and info["spacing"] == "trailing"
    assert main(["sample", str(run), "--sampler", "ddim", "--eta", "-1", "--out", str(tmp_path / "c")]) == 2
    argv = [
        "sample",
        str(run),
        "--num",
        "2",
        "--steps",
        "4",
        "--sampler",
        "dpm++2m",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(argv + ["--no-progress"]) == 0
    info = json.loads((tmp_path / "d" / "samples.json").read_text())
    assert info["sampler"] == "dpm++2m" and info["spacing"] == "logsnr"  # its default, recorded
    assert np.load(tmp_path / "d" / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_seeds_do_not_share_batches(idx_dir, tmp_path):
    ddpm.Trainer(tiny_config(idx_dir, steps=1), tmp_path / "run", progress=False).train()
    model, diffusion, _ = ddpm.load_model(tmp_path / "run")
    seed0 = ddpm.generate(model, diffusion, num=4, shape=(1, 8, 8), batch_size=2, steps=3, seed=0)
    seed1 = ddpm.generate(model, diffusion, num=4, shape=(1, 8, 8), batch_size=2, steps=3, seed=1)
    assert not torch.equal(seed0[2:], seed1[:2])  # batch 1 of seed 0 is not batch 0 of seed 1
    again = ddpm.generate(model, diffusion, num=4, shape=(1, 8, 8), batch_size=2, steps=3, seed=0)
    assert torch.equal(seed0, again)


def test_bf16_sampling_stays_close_to_fp32(idx_dir, tmp_path):
    ddpm.Trainer(tiny_config(idx_dir, steps=3), tmp_path / "run", progress=False).train()
    model, diffusion, _ = ddpm.load_model(tmp_path / "run")
    kwargs = dict(num=4, shape=(1, 8, 8), steps=10, seed=1)
    fp32 = ddpm.generate(model, diffusion, **kwargs)
    bf16 = ddpm.generate(model, diffusion, precision="bf16", **kwargs)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().mean() < 0.02
    assert not torch.equal(fp32, bf16)  # autocast really ran


def test_sample_options_and_keywords_are_the_same_call(idx_dir, tmp_path):
    import dataclasses
    import json

    import numpy as np

    from ddpm.errors import ConfigError
    from ddpm.sample import SampleOptions, sample_to_dir

    run = tmp_path / "run"
    ddpm.Trainer(tiny_config(idx_dir, steps=2), run, progress=False).train()
    options = SampleOptions(num=5, batch_size=2, seed=3, steps=6, sampler="ddim", eta=0.5, progress=False)
    a = sample_to_dir(run, tmp_path / "a", options)
    b = sample_to_dir(run, tmp_path / "b", num=5, batch_size=2, seed=3, steps=6, sampler="ddim", eta=0.5)
    assert np.array_equal(
        np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    )
    recorded = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert recorded == a and {k: a[k] for k in ("sampler", "eta", "spacing", "steps", "seed")} == {
        "sampler": "ddim",
        "eta": 0.5,
        "spacing": "linspace",
        "steps": 6,
        "seed": 3,
    }
    assert b["clip_denoised"] is True and "eta" in b
    # the sample is what generate gives from the loaded model with the same settings
    model, diffusion, _ = ddpm.load_model(run)
    direct = ddpm.generate(model, diffusion, 5, (1, 8, 8), 2, 3, 6, sampler="ddim", eta=0.5)
    assert np.array_equal(
        ddpm.to_uint8(direct).permute(0, 2, 3, 1).numpy(), np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    )
    with pytest.raises(ConfigError, match="eta is the noise level of ddim"):
        sample_to_dir(run, tmp_path / "c", dataclasses.replace(options, sampler="ancestral"))
    with pytest.raises(ConfigError, match="must be positive"):
        sample_to_dir(run, tmp_path / "c", num=0)
    with pytest.raises(TypeError):
        sample_to_dir(run, tmp_path / "c", samples=3)  # a misspelt option is not silently ignored


def test_an_unusable_out_fails_before_sampling(idx_dir, tmp_path, capsys, monkeypatch):
    from ddpm import sample
    from ddpm.cli import main

    run = tmp_path / "run"
    ddpm.Trainer(tiny_config(idx_dir, steps=1), run, progress=False).train()
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("sampled before checking --out"))
    (tmp_path / "taken").write_text("a file")
    assert main(["sample", str(run), "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error:") and err.count("\n") == 1


def test_a_reused_out_holds_only_the_new_samples(idx_dir, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from ddpm.sample import sample_to_dir

    run = tmp_path / "run"
    ddpm.Trainer(tiny_config(idx_dir, steps=1), run, progress=False).train()
    out = tmp_path / "out"
    sample_to_dir(run, out, num=6, steps=2, progress=False)
    (out / "points.npy").write_bytes(b"from an earlier 2-D model")
    info = sample_to_dir(run, out, num=3, steps=2, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 3
    assert json.loads((out / "samples.json").read_text()) == info and info["removed_stale"] == ["points.npy"]
    assert not (out / "points.npy").exists() and not list(out.glob(".partial-*"))
    Image.open(out / "grid.png").verify()


def test_a_killed_sample_leaves_the_previous_results_whole(idx_dir, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    import numpy as np
    from PIL import Image

    from ddpm.sample import sample_to_dir

    run = tmp_path / "run"
    ddpm.Trainer(tiny_config(idx_dir, steps=1), run, progress=False).train()
    out = tmp_path / "out"
    before = sample_to_dir(run, out, num=4, steps=2, progress=False)
    argv = [sys.executable, "-m", "ddpm", "sample", str(run), "--num", "3000", "--batch-size", "1000"]
    process = subprocess.Popen([*argv, "--steps", "2", "--out", str(out), "--no-progress"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:  # kill it while it writes PNGs
        staged = list(out.glob(".partial-*/images/*.png"))
        if len(staged) > 20:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(staged) > 20, "the kill came too late to land among the PNG writes"
    assert json.loads((out / "samples.json").read_text()) == before
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 4
    for png in (out / "images").iterdir():
        Image.open(png).verify()  # no truncated image among the results
    sample_to_dir(run, out, num=2, steps=2, progress=False)
    assert not list(out.glob(".partial-*"))  # the next run cleans up


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--sampler", "ddim", "--eta", "nan"], "eta must be a finite number >= 0, got nan"),
        (["--sampler", "ddim", "--eta", "-1"], "eta must be a finite number >= 0"),
        (["--eta", "0.5"], "the ancestral sampler has none"),
    ],
)
def test_bad_eta_is_refused_before_loading(argv, message, tmp_path, capsys):
    from ddpm.cli import main

    # the checkpoint does not even exist: the options are checked first
    assert main(["sample", str(tmp_path / "no-run"), *argv, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_class_conditional_run_samples_a_class_with_guidance(idx_dir, tmp_path, capsys):
    import json

    import numpy as np

    from ddpm.checkpoint import Checkpoint
    from ddpm.cli import main

    cfg = tiny_config(idx_dir, steps=3)
    cfg.data.labels = "classes"
    run = tmp_path / "run"
    ddpm.Trainer(cfg, run, progress=False).train()
    saved = Checkpoint(run).config
    assert saved["model"]["num_classes"] == 10 and saved["data"]["class_names"][1] == "Trouser"
    flags = ["--num", "4", "--steps", "3", "--no-progress"]
    assert (
        main(
            [
                "sample",
                str(run),
                "--class",
                "Trouser",
                "--guidance",
                "2",
                *flags,
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        main(["sample", str(run), "--class", "1", "--guidance", "2", *flags, "--out", str(tmp_path / "b")])
        == 0
    )
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"] for n in "ab")
    assert np.array_equal(a, b)  # by name or by index
    assert np.load(tmp_path / "a" / "samples.npz")["labels"].tolist() == [1, 1, 1, 1]
    model, _, _ = ddpm.load_model(run)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    with torch.no_grad():  # the class reaches the network; no class is the null one
        assert not torch.equal(model(x, t, torch.tensor([1, 1])), model(x, t))
        assert torch.equal(model(x, t, torch.tensor([10, 10])), model(x, t))
    made = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert made["classes"] == 1 and made["guidance"] == 2.0 and made["class_names"][1] == "Trouser"
    capsys.readouterr()
    for extra, message in (
        (["--class", "Hat"], "unknown class 'Hat'; this run's classes: T-shirt/top, Trouser"),
        (["--class", "1", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
        (["--guidance-interval", "5", "50"], "--guidance-interval must be (lo, hi) with 0 <= lo <= hi < 50"),
    ):
        assert main(["sample", str(run), *extra, *flags, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    plain = tmp_path / "plain"
    ddpm.Trainer(tiny_config(idx_dir, steps=1), plain, progress=False).train()
    assert main(["sample", str(plain), "--class", "1", *flags, "--out", str(tmp_path / "y")]) == 2
    assert "this model is unconditional" in capsys.readouterr().err
    assert (
        main(["sample", str(plain), "--guidance-rescale", "0.5", *flags, "--out", str(tmp_path / "y")]) == 2
    )
    assert "guidance options need a conditional run" in capsys.readouterr().err


def test_a_class_conditional_run_samples_every_class_in_rows_by_default(idx_dir, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from ddpm.sample import generate

    cfg = tiny_config(idx_dir, steps=2, num_sample_images=20, sample_steps=3)
    cfg.data.labels = "classes"
    run = tmp_path / "run"
    ddpm.Trainer(cfg, run, progress=False).train()
    # the training grid: 10 rows (one per class) of 2
    cell = 8 + 2
    assert Image.open(run / "samples" / "step_0000002.png").size == (2 + 2 * cell, 2 + 10 * cell)
    info = ddpm.sample_to_dir(
        run, tmp_path / "s", num=25, batch_size=7, steps=3, guidance=1.0, progress=False
    )
    labels = np.load(tmp_path / "s" / "samples.npz")["labels"]
    assert labels.tolist() == [i * 10 // 25 for i in range(25)] and info["classes"] == "balanced"
    # rows as wide as the largest class block (3), one per class
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 + 3 * cell, 2 + 10 * cell)
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["guidance"] == 1.0
    # through the Python API: the guided network, and each batch conditioned on its own rows
    from ddpm.conditions import guided_network
    from ddpm.images import to_uint8

    model, diffusion, saved = ddpm.load_model(run)
    guided = guided_network(model, saved, 1.0)
    kwargs = dict(batch_size=7, steps=3, seed=0)
    again = generate(guided, diffusion, 25, (1, 8, 8), cond=torch.tensor(labels), **kwargs)
    written = torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    assert torch.equal(to_uint8(again), written)
    others = generate(guided, diffusion, 25, (1, 8, 8), cond=torch.tensor(labels[::-1].copy()), **kwargs)
    assert not torch.equal(others[:7], again[:7])  # the classes reach the network


def test_conditional_training_resumes_exactly(idx_dir, tmp_path):
    from ddpm.checkpoint import Checkpoint

    def config(steps):
        cfg = tiny_config(idx_dir, steps=steps)
        cfg.data.labels = "classes"
        return cfg

    ddpm.Trainer(config(6), tmp_path / "a", progress=False).train()
    ddpm.Trainer(config(3), tmp_path / "b", progress=False).train()
    ddpm.Trainer(config(6), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for name, value in a.model.items():
        assert torch.equal(b.model[name], value), name
    assert "class_embed.weight" in a.model


def test_a_text_conditional_run_trains_resumes_exactly_and_keeps_its_encoder(text_run, tmp_path):
    from conftest import text_config
    from PIL import Image

    from ddpm.checkpoint import Checkpoint

    run, data, encoder = text_run
    saved = Checkpoint(run).config
    assert saved["model"]["context_dim"] == 32 and saved["data"]["labels"] == "captions"
    assert (run / "text-encoder" / "model.safetensors").is_file()  # the run can sample on its own
    # the training grid: a row per class prompt ("a photo of a coat", ...), 2 samples each
    assert Image.open(run / "samples" / "step_0000002.png").size == (2 + 2 * 10, 2 + 10 * 10)
    ddpm.Trainer(text_config(data, encoder, steps=4), tmp_path / "a", progress=False).train()
    ddpm.Trainer(text_config(data, encoder, steps=2), tmp_path / "b", progress=False).train()
    ddpm.Trainer(text_config(data, encoder, steps=4), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for name, value in a.model.items():
        assert torch.equal(b.model[name], value), name
    assert any("cross" in name for name in a.model)


@pytest.mark.parametrize("kind", ["domain", "transformers"])
def test_an_encoder_whose_pooled_text_is_narrower_than_its_states_works(text_run, tmp_path, kind):
    """A domain encoder 32 wide with a 16-wide projection, or a CLIP with one (24 -> 12): the U-Net's pooled
    text layer takes the projection's size (it once took the states' and failed on the first step)."""
    from conftest import text_config
    from test_encoders import tiny_clip_text

    from ddpm.checkpoint import Checkpoint
    from ddpm.cli import main
    from ddpm.clip import ClipConfig, DomainClip, save_clip
    from ddpm.images import load_samples

    _, data, _ = text_run
    encoder = tmp_path / "encoder"
    if kind == "domain":
        torch.manual_seed(0)
        clip = ClipConfig(width=32, layers=1, heads=2, max_length=40, embed_dim=16, image_width=8)
        save_clip(DomainClip(clip), {"format": "ddpm-text-encoder"}, encoder)
    else:
        tiny_clip_text(encoder)
    ddpm.Trainer(text_config(data, encoder, steps=2), tmp_path / "run", progress=False).train()
    model = Checkpoint(tmp_path / "run").config["model"]
    widths = (32, 16) if kind == "domain" else (24, 12)
    assert (model["context_dim"], model["pooled_dim"]) == widths
    assert Checkpoint(tmp_path / "run").model["text_pool.weight"].shape[1] == widths[1]
    ddpm.Trainer(text_config(data, encoder, steps=3), tmp_path / "run", resume=True, progress=False).train()
    args = ["sample", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--prompt", "a coat"]
    assert main([*args, "--guidance", "1", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert load_samples(tmp_path / "s").shape[0] == 2


def test_a_text_conditional_run_samples_prompts_in_rows_with_a_negative_prompt(text_run, tmp_path, capsys):
    import json

    import numpy as np

    from ddpm.cli import main

    run, _, _ = text_run
    flags = ["--num", "6", "--steps", "3", "--no-progress", "--no-ema"]
    prompts = ["--prompt", "a coat", "--prompt", "a large bag"]
    for name, extra in (
        ("plain", []),
        ("guided", ["--guidance", "3"]),
        ("negative", ["--guidance", "3", "--negative-prompt", "dark"]),
    ):
        assert main(["sample", str(run), *flags, *prompts, *extra, "--out", str(tmp_path / name)]) == 0
    made = json.loads((tmp_path / "negative" / "samples.json").read_text())
    assert made["prompts"] == ["a coat", "a large bag"] and made["negative_prompt"] == "dark"
    assert "labels" not in np.load(tmp_path / "plain" / "samples.npz")  # rows are prompts, not classes
    plain, guided, negative = (
        np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("plain", "guided", "negative")
    )
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative)
    # no prompt: one per class, in class order, so that eval fid can score class agreement
    assert main(["sample", str(run), *flags, "--num", "10", "--out", str(tmp_path / "default")]) == 0
    assert np.load(tmp_path / "default" / "samples.npz")["labels"].tolist() == list(range(10))
    capsys.readouterr()
    assert main(["sample", str(run), *flags, "--class", "1", "--out", str(tmp_path / "x")]) == 2
    assert "this model is text-conditional: give --prompt, not --class" in capsys.readouterr().err
    assert (
        main(
            [
                "figures",
                str(run),
                "--figure",
                "progressive",
                "--num",
                "2",
                "--frames",
                "2",
                "--prompt",
                "a coat",
                "--guidance",
                "1",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "f" / "figures.json").read_text())["prompt"] == "a coat"
    assert (
        main(
            ["figures", str(run), "--figure", "progressive", "--guidance", "1", "--out", str(tmp_path / "g")]
        )
        == 2
    )
    assert "--guidance needs --prompt" in capsys.readouterr().err


def test_a_prompt_for_a_class_conditional_or_unconditional_run_is_refused(class_run, tmp_path, capsys):
    from ddpm.cli import main

    run, _ = class_run
    assert main(["sample", str(run), "--prompt", "a coat", "--num", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--prompt and --negative-prompt need a text-conditional run; this one is class-conditional" in (
        capsys.readouterr().err
    )
    assert main(["invert", str(run), "--prompt", "a coat", "--out", str(tmp_path / "y")]) == 2
    assert "--prompt needs a text-conditional run; this one is class-conditional: use --class" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_a_run_can_train_its_text_tower_with_the_denoiser(text_run, mode, tmp_path, capsys):
    from conftest import text_config

    from ddpm.checkpoint import Checkpoint
    from ddpm.cli import main
    from ddpm.clip import load_clip

    _, data, encoder = text_run
    trained = {f"text.{k}": v for k, v in load_clip(encoder)[0].text.state_dict().items()}

    def config(steps):
        cfg = text_config(data, encoder, steps=steps, lr=2e-2)
        cfg.model.text_tower = mode
        return cfg

    ddpm.Trainer(config(4), tmp_path / "a", progress=False).train()
    ddpm.Trainer(config(2), tmp_path / "b", progress=False).train()
    ddpm.Trainer(config(4), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    for name, value in a.model.items():
        assert torch.equal(b.model[name], value), name
    # the tower is part of the model, and training moved it (from the encoder's weights, or from new ones)
    tower = {k: v for k, v in a.model.items() if k.startswith("text.")}
    assert tower.keys() == trained.keys() and any(k.startswith("denoiser.") for k in a.model)
    assert not torch.equal(tower["text.token_embedding.weight"], trained["text.token_embedding.weight"])
    if mode == "scratch":  # even the untouched position table is new
        assert not torch.equal(tower["text.position_embedding"], trained["text.position_embedding"])
    model, _, cfg = ddpm.load_model(tmp_path / "a")
    assert cfg.model.text_tower == mode and torch.equal(
        model.text.token_embedding.weight, a.ema["text.token_embedding.weight"]
    )
    flags = ["--num", "4", "--steps", "3", "--no-progress", "--prompt", "a coat", "--prompt", "a bag"]
    assert main(["sample", str(tmp_path / "a"), *flags, "--guidance", "2", "--out", str(tmp_path / "s")]) == 0
    assert (
        main(
            [
                "eval",
                "nll",
                str(tmp_path / "a"),
                "--num",
                "2",
                "--estimate-steps",
                "3",
                "--prompt",
                "a coat",
                "--data-dir",
                str(data),
                "--no-progress",
                "--out",
                str(tmp_path / "nll"),
            ]
        )
        == 0
    )


def test_only_a_domain_encoder_can_train_its_tower(text_run, tmp_path, capsys):
    from conftest import text_config
    from test_encoders import tiny_clip_text

    from ddpm.errors import ConfigError, DataError

    _, data, encoder = text_run
    cfg = text_config(data, tiny_clip_text(tmp_path / "clip"), steps=1)
    cfg.model.text_tower = "finetune"
    with pytest.raises(DataError, match="trains the text tower of a `ddpm train-text-encoder` folder"):
        ddpm.Trainer(cfg, tmp_path / "run", progress=False)
    cfg = text_config(data, encoder, steps=1)
    cfg.model.text_tower = "jointly"
    with pytest.raises(ConfigError, match="model.text_tower must be frozen, finetune, scratch"):
        ddpm.Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_runtime_reaches_the_network_once_and_generate_takes_it_wrapped(class_run, tmp_path, wrap_calls):
    """SampleOptions' device, precision and speed options travel as one Runtime to load_network, which
    wraps the network once: generate then calls it as it is (precision=None), with no second wrap. A bad
    precision is a one-line ConfigError before the run is loaded."""
    import numpy as np

    from ddpm.errors import ConfigError
    from ddpm.runtime import Runtime
    from ddpm.sample import SampleOptions, sample_to_dir

    run, _ = class_run
    seen = wrap_calls
    options = SampleOptions(num=4, batch_size=2, seed=1, steps=4, device="cpu", precision="bf16")
    options.progress = False
    assert options.runtime == Runtime("cpu", "bf16")
    plain = sample_to_dir(run, tmp_path / "plain", options)
    assert seen == [(torch.device("cpu"), "bf16", False, False, "default")]
    fast = sample_to_dir(run, tmp_path / "fast", options, channels_last=True, compile=True)
    assert seen[1:] == [(torch.device("cpu"), "bf16", True, True, "default")]
    assert fast.pop("channels_last") is True and fast.pop("compile") == "default"
    fast["seconds"] = plain["seconds"]
    assert fast == plain
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"].astype(int) for n in ("plain", "fast"))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02  # float rounding at most
    # generate: a network wrapped for its runtime is called as it is; a model is wrapped for precision
    model, diffusion, _ = ddpm.load_model(run)
    kwargs = dict(num=2, shape=(1, 8, 8), steps=3, seed=2, cond=torch.tensor([0, 1]))
    seen.clear()
    wrapped = ddpm.generate(Runtime("cpu", "bf16").wrap(model), diffusion, precision=None, **kwargs)
    assert len(seen) == 1  # by Runtime.wrap alone
    assert torch.equal(wrapped, ddpm.generate(model, diffusion, precision="bf16", **kwargs))
    with pytest.raises(
        ConfigError, match=r"^precision must be one of fp32, bf16, bf16-norm, auto, got 'fp16'$"
    ):
        sample_to_dir(tmp_path / "no-run", tmp_path / "c", options, precision="fp16")  # before loading


def test_auto_precision_samples_as_the_precision_it_chose_and_records_it(class_run, tmp_path):
    """precision "auto" (``ddpm sample --precision auto``): the samples are those of the precision its
    probe chose, asked for by name, and samples.json says which, with the probe's timings."""
    import json

    import numpy as np

    from ddpm.cli import main

    run, _ = class_run
    args = [str(run), "--num", "4", "--batch-size", "2", "--steps", "4", "--seed", "3", "--device", "cpu"]
    assert main(["sample", *args, "--out", str(tmp_path / "auto"), "--precision", "auto"]) == 0
    info = json.loads((tmp_path / "auto" / "samples.json").read_text())
    chose = info["precision"]
    assert chose in ("fp32", "bf16") and info["precision_probe"]["chose"] == chose
    assert set(info["precision_probe"]["seconds"]) == {"fp32", "bf16"}
    assert main(["sample", *args, "--out", str(tmp_path / "named"), "--precision", chose]) == 0
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("auto", "named"))
    assert np.array_equal(a, b)
    assert not (tmp_path / "c").exists()


def test_grids_show_at_most_256_samples_and_every_sample_is_kept(class_run, tmp_path):
    """1,000 samples made a 962x962 grid before; now a grid shows the first 256 (unconditional: 16x16) or,
    with classes, each class's first 25 in its row, while images/ and samples.npz keep all of them."""
    import numpy as np
    from PIL import Image

    from ddpm.images import save_grid

    run, _ = class_run
    cell = 8 + 2
    ddpm.sample_to_dir(run, tmp_path / "s", num=300, batch_size=300, steps=1, progress=False)
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 + 25 * cell, 2 + 10 * cell)
    assert len(list((tmp_path / "s" / "images").iterdir())) == 300
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape[0] == 300
    images = torch.arange(300, dtype=torch.uint8).reshape(300, 1, 1, 1).expand(300, 1, 8, 8)
    save_grid(images, tmp_path / "plain.png")
    grid = np.asarray(Image.open(tmp_path / "plain.png"))
    assert grid.shape[:2] == (2 + 16 * cell, 2 + 16 * cell)
    assert grid[2 + 15 * cell, 2 + 15 * cell] == 255  # the last cell is sample 255
