"""The conditioning package: one conditioner per run (the null condition in one place, requests into
each sample's condition, the guided network), the guidance value checked once, and the old names."""

import pytest
import torch

import ddpm.conditions
import ddpm.guidance
from ddpm import conditioning
from ddpm.build import build_diffusion, load_network
from ddpm.conditioning import (
    NULL_TEXT,
    ClassConditioner,
    ConditionRequest,
    Guidance,
    LowResConditioner,
    TextConditioner,
    Unconditional,
    make_conditioner,
)
from ddpm.conditioning.condition import ClassIds
from ddpm.errors import ConfigError


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(w=-1), r"^guidance must be a finite number >= 0 and at most 100, got -1$"),
        (dict(w=float("nan")), "^guidance must be a finite number"),
        (dict(rescale=1.5), r"^guidance_rescale must be in \[0, 1\], got 1.5$"),
        (dict(negative_prompt="bad \udcff"), "^negative_prompt is not valid UTF-8 text"),
    ],
)
def test_a_bad_guidance_value_is_refused_when_it_is_made(options, message):
    """The library names the field (the API's keyword); the CLI says the flag instead (test_cli)."""
    with pytest.raises(ConfigError, match=message) as caught:
        Guidance(**options)
    assert caught.value.field == message.split()[0].lstrip("^")


def test_the_guidance_value_records_what_it_does_and_checks_its_interval():
    assert Guidance(2.0).record() == {"guidance": 2.0} and not Guidance(2.0).options
    g = Guidance(1.0, interval=(3, 9), rescale=0.7)
    assert g.options and g.record() == {"guidance": 1.0, "guidance_interval": [3, 9], "guidance_rescale": 0.7}
    g.check_interval(10)
    with pytest.raises(
        ConfigError, match=r"^guidance_interval must be \(lo, hi\) with 0 <= lo <= hi < 9, got \(3, 9\)$"
    ):
        g.check_interval(9)


def test_each_run_gets_its_conditioner_and_the_null_condition_from_it(class_run, text_run):
    class_dir, _ = class_run
    loaded = load_network(class_dir)
    classes = make_conditioner(loaded.cfg, class_dir)
    assert isinstance(classes, ClassConditioner) and classes.null == loaded.cfg.model.num_classes == 10
    text_dir, _, _ = text_run
    text = make_conditioner(load_network(text_dir).cfg, text_dir)
    assert isinstance(text, TextConditioner)
    empty, negative = text.encoder.encode([NULL_TEXT]), text.encoder.encode(["blurry"])
    assert torch.equal(text.null().pooled, empty.pooled)
    assert torch.equal(text.null("blurry").pooled, negative.pooled)
    stage = load_network(class_dir).cfg
    stage.model.low_res = 4
    assert isinstance(make_conditioner(stage), LowResConditioner)
    plain = load_network(class_dir).cfg
    plain.model.num_classes, plain.data.labels = 0, "none"
    assert isinstance(make_conditioner(plain), Unconditional)


def test_a_request_becomes_each_samples_condition(class_run):
    class_dir, _ = class_run
    loaded = load_network(class_dir)
    conditioner = make_conditioner(loaded.cfg, class_dir)
    network, labels, cond, info = conditioner.for_samples(
        loaded.network, 6, Guidance(1.5), ConditionRequest("2"), 50
    )
    assert labels.tolist() == [2] * 6 and isinstance(cond, ClassIds) and cond.ids is labels
    assert info == {"classes": 2, "class_names": list(loaded.cfg.data.class_names), "guidance": 1.5}
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 7)
    with torch.no_grad():  # the guided network: (1 + w) conditional - w null-class output
        c, u = loaded.network(x, t, labels), loaded.network(x, t, torch.full((6,), 10))
        torch.testing.assert_close(network(x, t, labels), c + 1.5 * (c - u))
    _, labels, _, info = conditioner.for_samples(
        loaded.network, 10, Guidance(), ConditionRequest(), loaded.diffusion
    )
    assert labels.tolist() == list(range(10)) and info["classes"] == "balanced"
    with pytest.raises(ConfigError, match="need a text-conditional run; this one is class-conditional"):
        conditioner.for_samples(
            loaded.network, 4, Guidance(), ConditionRequest(prompts=["a coat"]), loaded.diffusion
        )
    with pytest.raises(ConfigError, match="^guidance_interval must be"):
        conditioner.for_samples(loaded.network, 4, Guidance(1, interval=(0, 50)), None, loaded.diffusion)


def test_the_old_module_names_still_work():
    assert ddpm.guidance.guided is conditioning.guided and ddpm.guidance.Guidance is Guidance
    assert ddpm.conditions.guided_network is conditioning.guided_network
    assert ddpm.conditions.check_request is conditioning.check_request


def test_a_super_resolution_stage_takes_low_res_images_and_nothing_else(class_run):
    cfg = load_network(class_run[0]).cfg
    cfg.model.low_res, cfg.model.num_classes = 4, 0
    stage = make_conditioner(cfg)
    with pytest.raises(ConfigError, match="takes low_res, not a class or prompt") as caught:
        stage.check(ConditionRequest(class_name="1", low_res="x"), Guidance())
    assert caught.value.field == "low_res"
    with pytest.raises(ConfigError, match="give low_res, the images to upsample") as caught:
        stage.check(ConditionRequest(), Guidance())
    assert caught.value.field == "low_res"
    with pytest.raises(
        ConfigError, match="^low_res_noise: the low-resolution noise level must be in"
    ) as caught:
        stage.check(ConditionRequest(low_res="x", low_res_noise=10**6), Guidance())
    assert caught.value.field == "low_res_noise"
    stage.check(ConditionRequest(), Guidance(), low_res_to_come=True)  # a pipeline's decoder, checked early
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    network, labels, cond, info = stage.for_samples(
        "net", 2, Guidance(), ConditionRequest(low_res=images), build_diffusion(cfg)
    )
    assert network == "net" and labels is None and cond.image.shape == (2, 1, 8, 8)
    assert info == {"low_res": "tensor", "low_res_size": 4, "low_res_noise": cfg.model.low_res_noise}
    with pytest.raises(ConfigError, match="^low_res: low-resolution inputs need a super-resolution stage"):
        make_conditioner(load_network(class_run[0]).cfg).for_samples(
            "net", 2, Guidance(), ConditionRequest(low_res=images)
        )
    with pytest.raises(ConfigError, match="^low_res_noise: low-resolution inputs need a") as caught:
        make_conditioner(load_network(class_run[0]).cfg).for_samples(
            "net", 2, Guidance(), ConditionRequest(low_res_noise=3)
        )
    assert caught.value.field == "low_res_noise"
    with pytest.raises(ConfigError, match="^low_res holds 3 images; 5 samples were asked for$") as caught:
        stage.for_samples("net", 5, Guidance(), ConditionRequest(low_res=images), build_diffusion(cfg))
    assert caught.value.field == "low_res"
