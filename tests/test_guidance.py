import pytest
import torch
from conftest import linear

from ddpm.conditioning.condition import ClassIds
from ddpm.errors import ConfigError
from ddpm.guidance import guided
from ddpm.samplers import SAMPLERS, sampling_chain
from ddpm.unet import UNet


def class_unet(out_channels=1):
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        out_channels=out_channels,
        ch=8,
        ch_mult=(1, 2),
        attn_resolutions=(4,),
        resolution=8,
        num_groups=4,
        num_classes=3,
        dropout=0.0,
    )
    with torch.no_grad():  # the output layer starts at ~0: give it weights, so that outputs differ
        net.conv_out.weight.normal_(0, 0.1)
    return net.eval()


def test_w_zero_is_the_conditional_model_and_w_follows_ho_and_salimans():
    net = class_unet()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 10])
    with torch.no_grad():
        cond, uncond = net(x, t, torch.tensor([1, 2])), net(x, t, torch.tensor([3, 3]))
        assert torch.equal(guided(net, torch.tensor([1, 2]), 3, 0.0)(x, t), cond)
        out = guided(net, torch.tensor([1, 2]), 3, 2.5)(x, t)
    torch.testing.assert_close(out, 3.5 * cond - 2.5 * uncond, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, uncond)  # the class really matters


def test_both_branches_run_in_one_forward_pass():
    calls = []

    def model(x, t, y):  # guided hands the model a condition: class ids as ClassIds
        calls.append(x.shape[0])
        return x * (1 + y.ids.float()[:, None])

    x, t = torch.ones(4, 2), torch.zeros(4, dtype=torch.long)
    out = guided(model, 1, 0, 1.0)(x, t)
    assert calls == [8] and torch.equal(out, torch.full((4, 2), 3.0))  # 2 * 2 - 1 * 1


def test_learned_variance_channels_come_from_the_conditional_branch():
    net = class_unet(out_channels=2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 5, 5])
    with torch.no_grad():
        cond, uncond = net(x, t, torch.tensor([0, 0, 0])), net(x, t, torch.tensor([3, 3, 3]))
        out = guided(net, 0, 3, 4.0, channels=1)(x, t)
    torch.testing.assert_close(out[:, :1], 5 * cond[:, :1] - 4 * uncond[:, :1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])


def test_interval_and_rescale():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * (1 + y.ids.float().reshape(-1, 1))

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    network = guided(model, 2, 0, 3.0, interval=(100, 500))
    assert torch.equal(network(x, torch.full((3,), 50)), 3 * x)  # outside: the conditional branch alone
    assert calls == [3]
    network(x, torch.full((3,), 300))
    assert calls == [3, 6]
    full = guided(model, 2, 0, 3.0, rescale=1.0)(x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(full.std(dim=1), (3 * x).std(dim=1))  # the conditional output's spread
    with pytest.raises(ConfigError, match="scale must be a finite number"):
        guided(model, 2, 0, float("nan"))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_takes_a_guided_model(name):
    net = class_unet()
    chain = sampling_chain(linear(T=50), name, 5)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(model):
        g = torch.Generator().manual_seed(4)  # the ancestral sampler's fresh noise, alike in every run
        return SAMPLERS[name].loop(chain, model, (2, 1, 8, 8), x_start=x_T, generator=g)

    plain = run(lambda x, t: net(x, t, torch.tensor([1, 2])))
    assert torch.equal(run(guided(net, torch.tensor([1, 2]), 3, 0.0)), plain)
    strong = run(guided(net, torch.tensor([1, 2]), 3, 3.0))
    assert torch.isfinite(strong).all() and not torch.equal(strong, plain)


def test_class_ids_guide_exactly_as_the_bare_ids_and_ints_did():
    """ClassIds, a tensor of ids and an int id (the forms callers gave before ClassIds) guide to the same
    numbers, bit for bit, inside and outside an interval, and so does the U-Net on each form."""
    net = class_unet(out_channels=2)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([0, 2, 1])
    with torch.no_grad():
        for t in (torch.full((3,), 4), torch.full((3,), 40)):
            for options in (dict(), dict(channels=1, interval=(0, 10), rescale=0.5)):
                new = guided(net, ClassIds(ids), ClassIds.of(3), 2.0, **options)(x, t)
                assert torch.equal(guided(net, ids, 3, 2.0, **options)(x, t), new)
                assert torch.equal(guided(net, ids, torch.tensor(3), 2.0, **options)(x, t), new)
            one = guided(net, ClassIds.of(1), ClassIds.of(3), 1.5)(x, t)
            assert torch.equal(guided(net, 1, 3, 1.5)(x, t), one)
            assert torch.equal(guided(net, torch.tensor([1, 1, 1]), torch.tensor([3, 3, 3]), 1.5)(x, t), one)
            assert torch.equal(net(x, t, ClassIds(ids)), net(x, t, ids))
            assert torch.equal(net(x, t, ClassIds.of(3)), net(x, t))  # one id for all; none: the null class
            assert torch.equal(net(x, t, torch.tensor(1)), net(x, t, ClassIds(torch.tensor([1, 1, 1]))))
