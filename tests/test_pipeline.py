"""The three-part pipeline: assembled from trained parts, run end to end (equal to running the two
stages by hand), and refused with one line naming the part when the parts do not fit."""

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import make_idx_dir, text_config, tiny_config

import ddpm
from ddpm.cli import main
from ddpm.clip import ClipConfig, DomainClip, save_clip
from ddpm.images import load_samples
from ddpm.train import Trainer


def assemble(pipe, generator, decoder, *extra):
    return main(["pipeline", str(pipe), "--generator", str(generator), "--decoder", str(decoder), *extra])


def encoder_folder(path, width=32, seed=0):
    torch.manual_seed(seed)
    config = ClipConfig(width=width, layers=1, heads=2, max_length=40, embed_dim=32, image_width=8)
    save_clip(DomainClip(config), {"format": "ddpm-text-encoder"}, path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A text generator at 4x4, a super-resolution stage 4 -> 8 and a class generator at 8x8."""
    base = tmp_path_factory.mktemp("pipeline-parts")
    data = make_idx_dir(base / "idx")
    encoder = encoder_folder(base / "encoder")
    cfg = text_config(data, encoder, steps=2, lr=2e-2)
    cfg.data.image_size = 4
    Trainer(cfg, base / "text-4", progress=False).train()
    cfg = tiny_config(data, steps=3)
    cfg.model.low_res, cfg.model.low_res_noise_max, cfg.model.low_res_noise = 4, 20, 5
    Trainer(cfg, base / "sr-4-8", progress=False).train()
    cfg = tiny_config(data, steps=2)
    cfg.data.labels = "classes"
    Trainer(cfg, base / "class-8", progress=False).train()
    return base


def test_generate_runs_the_stages_as_sampling_them_by_hand_would(parts, tmp_path):
    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    spec = json.loads((pipe / "pipeline.json").read_text())
    assert [p["role"] for p in spec["parts"]] == ["text-encoder", "generator", "decoder"]
    generator = spec["parts"][1]["path"]  # relative: the folders can move together
    assert not generator.startswith("/") and (pipe / generator).resolve() == (parts / "text-4").resolve()
    prompts = ["--prompt", "a photo of a coat", "--prompt", "a dark shirt"]
    common = ["--num", "4", "--seed", "3", "--no-progress"]
    out = tmp_path / "out"
    args = [
        "generate",
        str(pipe),
        *prompts,
        *common,
        "--guidance",
        "2",
        "--steps",
        "4",
        "--decoder-steps",
        "3",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"grid.png", "low-res-grid.png", "images", "samples.npz"}
    record = json.loads((out / "generate.json").read_text())
    assert record["generator"]["prompts"] == ["a photo of a coat", "a dark shirt"]
    assert record["generator"]["guidance"] == 2.0 and record["decoder"]["low_res_noise"] == 5
    # by hand: sample the generator, then the stage on those samples
    by_hand = ["--sampler", "ddim", *common]
    base_args = [*prompts, "--guidance", "2", "--steps", "4", "--out", str(tmp_path / "a")]
    assert main(["sample", str(parts / "text-4"), *by_hand, *base_args]) == 0
    stage_args = ["--low-res", str(tmp_path / "a"), "--steps", "3", "--out", str(tmp_path / "b")]
    assert main(["sample", str(parts / "sr-4-8"), *by_hand, *stage_args]) == 0
    images = load_samples(out)
    assert images.shape == (4, 1, 8, 8) and torch.equal(images, load_samples(tmp_path / "b"))
    # the Python API gives the same
    made = ddpm.Pipeline.load(pipe)(
        prompts=["a photo of a coat", "a dark shirt"],
        guidance=2.0,
        num=4,
        seed=3,
        generator_options=ddpm.SampleOptions(sampler="ddim", steps=4, progress=False),
        decoder_options=ddpm.SampleOptions(sampler="ddim", steps=3, progress=False),
    )
    assert torch.equal(made.images, images) and made.labels.tolist() == [0, 0, 1, 1]


def test_generate_passes_each_stage_its_own_eta(parts, tmp_path):
    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    common = ["--num", "2", "--seed", "5", "--no-progress", "--prompt", "a photo of a coat"]
    generator = ["--sampler", "sde-dpm++3m", "--eta", "3", "--steps", "3"]
    decoder = ["--sampler", "ddim", "--eta", "0.5", "--steps", "2"]
    out = tmp_path / "out"
    stage = ["--decoder-sampler", "ddim", "--decoder-eta", "0.5", "--decoder-steps", "2"]
    assert main(["generate", str(pipe), *common, *generator, *stage, "--out", str(out)]) == 0
    assert main(["sample", str(parts / "text-4"), *common, *generator, "--out", str(tmp_path / "a")]) == 0
    by_hand = ["--low-res", str(tmp_path / "a"), "--out", str(tmp_path / "b")]
    assert main(["sample", str(parts / "sr-4-8"), *common[:5], *decoder, *by_hand]) == 0
    assert torch.equal(load_samples(out), load_samples(tmp_path / "b"))
    # eta 0.5 changes the decoder's samples (it is not ignored), and a bad one is refused before any work
    assert main(["generate", str(pipe), *common, *generator, "--out", str(tmp_path / "c")]) == 0
    assert not torch.equal(load_samples(out), load_samples(tmp_path / "c"))
    bad = ["--decoder-sampler", "ancestral", "--decoder-eta", "1", "--out", str(tmp_path / "d")]
    assert main(["generate", str(pipe), *common, *bad]) == 2 and not (tmp_path / "d").exists()


def test_a_class_generator_takes_classes_and_swapping_the_decoder_is_an_edit(parts, tmp_path):
    pipe = tmp_path / "pipe"
    # a class generator at 8x8 needs a decoder from 8: the 4 -> 8 stage does not fit
    code = main(
        ["pipeline", str(pipe), "--generator", str(parts / "class-8"), "--decoder", str(parts / "sr-4-8")]
    )
    assert code == 2 and not pipe.exists()
    # the text pipeline's generator swapped for the class run, in the folder's file: refused on load
    assert (
        main(
            ["pipeline", str(pipe), "--generator", str(parts / "text-4"), "--decoder", str(parts / "sr-4-8")]
        )
        == 0
    )
    spec = json.loads((pipe / "pipeline.json").read_text())
    spec["parts"][0]["path"] = str(parts / "class-8")
    (pipe / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(ddpm.ConfigError, match="upsamples 4x4 images; the generator makes 8x8"):
        ddpm.Pipeline.load(pipe)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, p: s["parts"][2].update(path=str(p / "missing")), "pipeline decoder"),
        (lambda s, p: s["parts"][2].update(path=str(p / "text-4")), "is not a super-resolution stage"),
        (lambda s, p: s["parts"][1].update(path=str(p / "sr-4-8")), "generator"),
        (lambda s, p: s["parts"][0].update(path=str(p / "encoder-16")), "gives 16-wide states"),
        (lambda s, p: s["parts"][0].update(path=str(p / "encoder-other")), "not the one the generator was"),
        (lambda s, p: s["parts"].reverse(), "must come in the order"),
        (lambda s, p: s["parts"][2].update(kind="vq"), "decoder kind must be"),
        (lambda s, p: s.update(format="other"), "is damaged"),
    ],
)
def test_parts_that_do_not_fit_are_named_in_one_line(parts, tmp_path, capsys, edit, message):
    if not (parts / "encoder-16").exists():
        encoder_folder(parts / "encoder-16", width=16)
        encoder_folder(parts / "encoder-other", seed=1)
    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    spec = json.loads((pipe / "pipeline.json").read_text())
    edit(spec, parts)
    (pipe / "pipeline.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(["generate", str(pipe), "--out", str(tmp_path / "out"), "--num", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class", "coat"], "give --prompt, not --class"),
        (["--steps", "0"], "steps"),
        (["--low-res-noise", "99"], "noise level must be in 0..50"),
        (["--num", "0"], "must be positive"),
    ],
)
def test_bad_requests_write_nothing(parts, tmp_path, capsys, extra, message):
    pipe = tmp_path / "pipe"
    assert (
        main(
            ["pipeline", str(pipe), "--generator", str(parts / "text-4"), "--decoder", str(parts / "sr-4-8")]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["generate", str(pipe), "--out", str(tmp_path / "out"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_prompt_on_a_class_generator_is_refused(parts, tmp_path, capsys):
    sr = tmp_path / "sr-8-16"  # a stage that fits the class generator's 8x8 needs 16x16 data
    data = make_idx_dir(tmp_path / "idx16")
    cfg = tiny_config(data, steps=1)
    cfg.data.image_size, cfg.model.low_res, cfg.model.low_res_noise_max, cfg.model.low_res_noise = (
        16,
        8,
        20,
        5,
    )
    cfg.model.ch_mult, cfg.model.attn_resolutions = (1, 2), (8,)
    Trainer(cfg, sr, progress=False).train()
    pipe = tmp_path / "pipe"
    assert main(["pipeline", str(pipe), "--generator", str(parts / "class-8"), "--decoder", str(sr)]) == 0
    capsys.readouterr()
    args = ["generate", str(pipe), "--out", str(tmp_path / "out"), "--num", "2", "--no-progress"]
    assert main([*args, "--prompt", "a coat"]) == 2
    assert "need a text-conditional run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--class", "1", "--steps", "2", "--decoder-steps", "2"]) == 0
    assert load_samples(tmp_path / "out").shape == (2, 1, 16, 16)
    shutil.rmtree(tmp_path / "out")


def test_eval_text_scores_a_pipeline_on_its_final_images(parts, tmp_path, capsys):
    """`ddpm eval text PIPELINE` draws through the whole pipeline and scores the 8x8 images it ends with
    (the generator's own are 4x4), with the generator's text encoder as the domain CLIP pair."""
    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8") == 0
    argv = ["eval", "text", str(pipe), "--per-prompt", "2", "--steps", "2", "--no-progress"]
    argv += ["--prompt", "a photo of a dark coat", "--prompt", "a photo of a bag"]
    argv += ["--data-dir", str(parts / "idx"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    result = json.loads((pipe / "text-eval-4" / "text-eval.json").read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(pipe / "text-eval-4" / "text-eval.json")
    assert result["num_samples"] == 4 and result["prompts"] == 2
    assert load_samples(pipe / "text-eval-4").shape == (4, 1, 8, 8)
    assert result["pipeline"]["decoder"]["low_res"] == "the generator's samples"
    assert result["sampling"]["prompts"] == ["a photo of a dark coat", "a photo of a bag"]
    assert result["domain_clip_score"]["model"].endswith("text-4/text-encoder")
    assert result["class_agreement"]["samples_naming_a_class"] == 4


def test_generate_loads_each_part_once(parts, tmp_path, monkeypatch):
    """The decoder's network is loaded once, before the generator draws (its options checked then, not
    on stand-in images), and the text encoder once: the pipeline's, handed to the generator's sampling."""
    from ddpm import build, encoders

    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    loaded, encoded = [], []
    load_model, make_encoder = build.load_model, encoders.DomainTextEncoder.__init__

    def counted_load(ckpt, *args, **kwargs):
        loaded.append(ckpt.path.parent.name)
        return load_model(ckpt, *args, **kwargs)

    def counted_encoder(self, folder):
        encoded.append(folder)
        make_encoder(self, folder)

    monkeypatch.setattr(build, "load_model", counted_load)
    monkeypatch.setattr(encoders.DomainTextEncoder, "__init__", counted_encoder)
    options = ddpm.SampleOptions(sampler="ddim", steps=3, progress=False)
    pipeline = ddpm.Pipeline.load(pipe)
    draw = pipeline.prepare(prompts=["a coat"], num=2, generator_options=options, decoder_options=options)
    assert loaded == ["text-4", "sr-4-8"] and len(encoded) == 1
    made = draw()
    assert loaded == ["text-4", "sr-4-8"] and len(encoded) == 1 and made.images.shape == (2, 1, 8, 8)
    assert made.record["decoder"]["low_res"] == "the generator's samples"
    # a later request (another seed, sampler and count) reuses both loaded networks
    other = dataclasses.replace(options, sampler="ancestral")
    again = pipeline(prompts=["a coat"], num=3, seed=9, generator_options=other, decoder_options=options)
    assert loaded == ["text-4", "sr-4-8"] and again.images.shape == (3, 1, 8, 8)
    # the decoder's options are checked before anything is drawn
    bad = dataclasses.replace(options, guidance=1.0)
    with pytest.raises(ddpm.ConfigError, match="super-resolution stage: it takes low_res, not a class"):
        pipeline.prepare(prompts=["a coat"], num=2, decoder_options=bad)


def test_a_whole_guidance_value_reaches_the_generator(parts, tmp_path):
    from ddpm.conditioning import Guidance

    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    fast = ddpm.SampleOptions(sampler="ddim", steps=2, progress=False)
    guidance = Guidance(2.0, interval=(1, 40), rescale=0.5, negative_prompt="a dark coat")
    made = ddpm.Pipeline.load(pipe)(
        prompts=["a coat"], guidance=guidance, num=2, generator_options=fast, decoder_options=fast
    )
    record = made.record["generator"]
    assert (record["guidance"], record["guidance_interval"], record["guidance_rescale"]) == (
        2.0,
        [1, 40],
        0.5,
    )
    assert record["negative_prompt"] == "a dark coat" and made.images.shape == (2, 1, 8, 8)

    # and from the command line, every guidance option of `ddpm generate` reaches it alike
    argv = ["generate", str(pipe), "--prompt", "a coat", "--guidance", "2", "--guidance-interval", "1", "40"]
    argv += ["--guidance-rescale", "0.5", "--negative-prompt", "a dark coat", "--num", "2", "--steps", "2"]
    assert main([*argv, "--decoder-steps", "2", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    generated = json.loads((tmp_path / "cli" / "generate.json").read_text())["generator"]
    assert {k: generated[k] for k in record if k.startswith(("guidance", "negative"))} == {
        k: v for k, v in record.items() if k.startswith(("guidance", "negative"))
    }


def test_a_served_pipeline_draws_what_generate_draws(parts, tmp_path):
    """`ddpm serve PIPELINE`'s Studio: the page's request through both stages, as the API draws it."""
    from ddpm.conditioning.guidance import Guidance
    from ddpm.serve import Request, Studio

    pipe = tmp_path / "pipe"
    assert assemble(pipe, parts / "text-4", parts / "sr-4-8", "--text-encoder", str(parts / "encoder")) == 0
    studio = Studio(pipe)
    assert studio.conditioning == "text"
    request = Request(prompt="a dark shirt", negative_prompt="a coat", guidance=1.5, steps=3, seed=2, count=2)
    images = studio.draw(request)
    # the page's default sampler and its eta, in both stages
    options = ddpm.SampleOptions(sampler="sde-dpm++3m", eta=3.0, steps=3, progress=False)
    made = ddpm.Pipeline.load(pipe)(
        prompts=["a dark shirt"],
        guidance=Guidance(1.5, negative_prompt="a coat"),
        num=2,
        seed=2,
        generator_options=options,
        decoder_options=options,
    )
    assert images.shape == (2, 1, 8, 8) and torch.equal(images, made.images)
