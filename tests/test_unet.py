import math

import pytest
import torch
from conftest import count_parameters

from ddpm.build import build_model
from ddpm.convert import unet_state_dict_from_diffusers
from ddpm.presets import preset
from ddpm.unet import Downsample, UNet, timestep_embedding


@pytest.mark.parametrize(
    "name,expected", [("cifar10", 35_746_307), ("celebahq256", 113_673_219), ("lsun256", 113_673_219)]
)
def test_paper_parameter_counts(name, expected):
    cfg = preset(name)
    with torch.device("meta"):  # count without allocating or initialising
        model = build_model(cfg, 3)
    assert count_parameters(model) == expected


def test_timestep_embedding_is_sin_then_cos_with_half_minus_one_divisor():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 128)
    half = 64
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
    torch.testing.assert_close(emb[:, :half], torch.sin(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, half:], torch.cos(t[:, None] * freqs))
    assert emb[0, :half].abs().max() == 0 and emb[0, half:].min() == 1


def test_downsample_pads_like_tensorflow_same():
    """Stride-2 'SAME' on even sizes pads 0 before and 1 after: output pixel (0, 0) sees input rows and
    columns 0..2, not -1..1."""
    down = Downsample(1, with_conv=True)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each 3x3 window
        down.conv.bias.zero_()
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    y = down(x)
    assert y.shape == (1, 1, 4, 4)
    assert torch.equal(y[0, 0], x[0, 0, ::2, ::2])


def test_initialisation_is_xavier_fan_avg_with_tiny_output_layers():
    model = UNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, num_groups=8)
    w = model.down[0].blocks[0].conv1.weight  # 3x3 conv 32 -> 32: fan_in = fan_out = 288
    bound = math.sqrt(6 / (288 + 288))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.down[0].blocks[0].conv1.bias.abs().max() == 0
    # "zero" layers use variance scale 1e-10, so weights are 1e-5 times the Xavier bound
    for tiny in (model.down[0].blocks[0].conv2, model.mid_attn.proj_out, model.conv_out):
        fan_in = tiny.weight.shape[1] * tiny.weight[0, 0].numel()
        fan_out = tiny.weight.shape[0] * tiny.weight[0, 0].numel()
        tiny_bound = 1e-5 * math.sqrt(6 / (fan_in + fan_out))
        assert 0 < tiny.weight.abs().max() <= tiny_bound
    assert model.norm_out.eps == 1e-6


def diffusers_paper_unet(sample_size=32, channels=(128, 256, 256, 256), attn_level=1, in_channels=3):
    from diffusers import UNet2DModel

    down = ["AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(len(channels))]
    up = [
        "AttnUpBlock2D" if i == len(channels) - 1 - attn_level else "UpBlock2D" for i in range(len(channels))
    ]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=2,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.0,
    )


@pytest.mark.parametrize("small", [True, False])
def test_matches_diffusers_unet_after_weight_mapping(small):
    """diffusers' UNet2DModel configured as the paper's network computes the same function as ours."""
    torch.manual_seed(0)
    if small:
        theirs = diffusers_paper_unet(16, (32, 64), attn_level=1, in_channels=1)
        ours = UNet(in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, dropout=0.0)
    else:
        theirs = diffusers_paper_unet()
        ours = UNet(dropout=0.0)
    # Random non-trivial weights everywhere (diffusers and our init both leave some layers near zero).
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict()), strict=True)
    theirs.eval(), ours.eval()
    x = torch.randn(2, ours.in_channels, ours.resolution, ours.resolution)
    t = torch.tensor([3, 817])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_wrong_input_size_is_refused():
    model = UNet(in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, num_groups=8)
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 1, 32, 32), torch.tensor([0]))


def test_any_channels_and_resolution():
    model = UNet(in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(7,), resolution=28, num_groups=8)
    out = model(torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 28, 28)


def test_diffusers_config_export_round_trips_and_computes_the_same_function():
    """The fashion-mnist preset's network, exported as a diffusers config: it maps back to the same
    config, has the same parameter count, and computes the same function after weight mapping."""
    from diffusers import UNet2DModel

    from ddpm.build import build_model
    from ddpm.convert import diffusers_unet_config, model_config_from_diffusers
    from ddpm.presets import preset

    cfg = preset("fashion-mnist")
    cfg.model.dropout = 0.0
    exported = diffusers_unet_config(cfg.model, 28, 1)
    model_cfg, size, channels = model_config_from_diffusers(exported)
    assert (model_cfg, size, channels) == (cfg.model, 28, 1)
    torch.manual_seed(0)
    theirs = UNet2DModel(**exported).eval()
    ours = build_model(cfg, 1).eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict()), strict=True)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-4, atol=1e-4)


def test_class_conditioning_adds_an_embedding_and_keeps_the_unconditional_net():
    from ddpm.presets import preset

    base = build_model(preset("cifar10"), 3)
    torch.manual_seed(0)
    plain = UNet(in_channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4)
    torch.manual_seed(0)
    cond = UNet(
        in_channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4, num_classes=10
    )
    assert count_parameters(base) == 35_746_307 and base.class_embed is None
    assert count_parameters(cond) == count_parameters(plain) + 11 * 32  # 10 classes + the null one
    for name, value in plain.state_dict().items():  # the same initial weights for everything else
        assert torch.equal(cond.state_dict()[name], value)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        a, b = cond.eval()(x, t, torch.tensor([0, 0, 0])), cond(x, t, torch.tensor([5, 5, 5]))
        assert not torch.equal(a, b)
        assert torch.equal(cond(x, t), cond(x, t, torch.tensor([10, 10, 10])))  # no y: the null class
        assert torch.equal(cond(x, t, torch.tensor(5)), b)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 0, 0]))


def test_text_conditioning_adds_cross_attention_and_a_pooled_embedding_only():
    from ddpm.text import TextEncoding

    small = dict(in_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8, num_groups=4)
    torch.manual_seed(0)
    plain = UNet(**small)
    torch.manual_seed(0)
    net = UNet(**small, context_dim=16).eval()
    for name, value in plain.state_dict().items():  # the same initial weights for everything else
        assert torch.equal(net.state_dict()[name], value)
    # cross-attention after the 2 down, 1 middle and 3 up self-attentions; heads of 32 channels
    crosses = [m for m in net.modules() if m.__class__.__name__ == "CrossAttention"]
    assert len(crosses) == 6 and {c.heads for c in crosses} == {2}
    per_cross = 2 * 64 + 64 * 64 + 64 + 2 * (16 * 64 + 64) + 64 * 64 + 64  # norm, q, k, v, proj_out
    temb = 4 * 32
    assert count_parameters(net) == count_parameters(plain) + 6 * per_cross + 16 * temb + temb
    with torch.no_grad():  # give the zero-initialised outputs weights, so that the text shows
        for c in crosses:
            c.proj_out.weight.normal_(0, 0.2)
        net.conv_out.weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    tokens, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([3, 9])
    with torch.no_grad():
        out = net(x, t, TextEncoding(tokens, mask, pooled))
        padded = tokens.clone()
        padded[0, 3:] = 100.0  # what sits under the padding mask is never attended to
        assert torch.allclose(net(x, t, TextEncoding(padded, mask, pooled)), out, atol=1e-5)
        other = tokens.clone()
        other[0, 1] += 1.0
        changed = net(x, t, TextEncoding(other, mask, pooled))
        assert not torch.allclose(changed[0], out[0], atol=1e-4) and torch.allclose(changed[1], out[1])
        one = net(x, t, TextEncoding(tokens[:1], mask[:1], pooled[:1]))  # one text for the whole batch
        assert torch.allclose(one[0], out[0], atol=1e-6)
    with pytest.raises(ValueError, match="text-conditional: give a TextEncoding"):
        net(x, t)
    with pytest.raises(ValueError, match="classes or on text, not both"):
        UNet(**small, num_classes=3, context_dim=16)
