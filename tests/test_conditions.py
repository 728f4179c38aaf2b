"""ddpm.conditions: class requests, balanced class blocks, and the guided network a sampler calls."""

import pytest
import torch
from test_guidance import class_unet

from ddpm.conditioning import make_conditioner
from ddpm.conditions import balanced_classes, check_request, class_index, guided_network
from ddpm.config import Config, DataConfig, DiffusionConfig, ModelConfig
from ddpm.errors import ConfigError


def class_config(var_type="fixedlarge"):
    return Config(
        model=ModelConfig(num_classes=3),
        diffusion=DiffusionConfig(var_type=var_type),
        data=DataConfig(channels=1, class_names=("cat", "dog", "7")),
    )


def test_balanced_classes_are_equal_contiguous_blocks():
    assert balanced_classes(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    labels = balanced_classes(64, 10)
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 64 and counts.max() - counts.min() <= 1
    assert torch.equal(labels, labels.sort().values)  # one block per class: one grid row each
    assert balanced_classes(3, 10).tolist() == [0, 3, 6]  # fewer samples than classes: spread out


def test_a_class_is_named_or_indexed_and_a_name_wins_over_an_index():
    cfg = class_config()
    assert class_index(cfg, "dog") == 1 and class_index(cfg, 2) == 2 and class_index(cfg, "2") == 2
    assert class_index(cfg, "7") == 2  # "7" is a class name here, not the (absent) index 7
    with pytest.raises(ConfigError, match="unknown class 'Hat'; this run's classes: cat, dog, 7"):
        class_index(cfg, "Hat")
    with pytest.raises(ConfigError, match="unknown class 3;"):  # 3 is the null class, not a class
        class_index(cfg, 3)


def test_requests_an_unconditional_run_cannot_take_are_refused():
    plain = Config()
    assert check_request(plain, None) is None
    for name, w, field in (("1", 0.0, "class_name"), (None, 1.0, "guidance"), ("1", 1.0, "class_name")):
        with pytest.raises(
            ConfigError, match=f"^this model is unconditional: {field} needs a conditional run$"
        ):
            check_request(plain, name, w)
    with pytest.raises(ConfigError, match="^guidance must be a finite number >= 0") as caught:
        check_request(class_config(), "cat", float("nan"))
    assert caught.value.field == "guidance"
    with pytest.raises(ConfigError, match="^prompt is not valid UTF-8") as caught:  # check_request's keyword
        check_request(class_config(), None, prompt="bad \udcff")
    assert caught.value.field == "prompt"


def test_one_request_guides_towards_the_class_and_no_class_is_the_null_one():
    net, cfg = class_unet(), class_config()
    conditioner = make_conditioner(cfg)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([7, 7])
    with torch.no_grad():
        cond, null = net(x, t, torch.tensor([1, 1])), net(x, t, torch.tensor([3, 3]))
        dog = check_request(cfg, "dog", 1.5)
        torch.testing.assert_close(conditioner.for_one(net, dog, 1.5)(x, t), 2.5 * cond - 1.5 * null)
        assert torch.equal(conditioner.for_one(net, None)(x, t), net(x, t))
        assert torch.equal(net(x, t), null)
    with pytest.raises(ConfigError, match="^guidance needs class_name"):
        conditioner.for_one(net, None, 2.0)


def test_with_a_learned_variance_only_the_prediction_is_guided():
    net, cfg = class_unet(out_channels=2), class_config("learned_range")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    with torch.no_grad():
        cond, null = net(x, t, torch.tensor([0, 2])), net(x, t, torch.tensor([3, 3]))
        out = guided_network(net, cfg, 2.0)(x, t, torch.tensor([0, 2]))
    torch.testing.assert_close(out[:, :1], 3 * cond[:, :1] - 2 * null[:, :1])
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_grid_prompts_name_each_class_or_take_the_first_captions():
    from ddpm.conditions import grid_prompts

    cfg = class_config()
    cfg.data.class_names = ("Cat", "Ankle boot")
    assert grid_prompts(cfg) == ["a photo of a cat", "a photo of an ankle boot"]
    cfg.data.class_names = ()
    captions = ["b", "", "a", "b"] + [str(i) for i in range(10)]
    assert grid_prompts(cfg, captions) == ["b", "a", "0", "1", "2", "3", "4", "5"]
