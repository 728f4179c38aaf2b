"""The noise-prediction U-Net of the original DDPM code (`diffusion_tf/models/unet.py`), layer for layer.

Details that matter for faithfulness (shared/PAPER.md, section 3): GroupNorm eps 1e-6; sinusoidal time
embedding with sin before cos and a (half - 1) divisor; TensorFlow 'SAME' padding in the strided
downsampling convolution (0 before, 1 after on even sizes); Xavier fan-avg uniform initialisation where
the output layers of each block use a variance scale of 1e-10 instead of zero.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning.condition import ClassIds, Condition
from .conditioning.low_res import LowResImage
from .text import TextEncoding


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the integer timesteps t (shape [B]): [sin, cos]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def variance_scaling_init_(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """TF's variance_scaling(scale, 'fan_avg', 'uniform'): Xavier-uniform with gain sqrt(scale), zero bias.

    The original passes scale = 1e-10 for layers meant to start near zero, so those weights are
    Xavier-uniform times 1e-5 (a variance scale, not a weight scale).
    """
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1, scale: float = 1.0):
    return variance_scaling_init_(nn.Conv2d(in_ch, out_ch, kernel, stride, padding), scale)


def linear(in_features: int, out_features: int, scale: float = 1.0):
    return variance_scaling_init_(nn.Linear(in_features, out_features), scale)


ZERO = 1e-10  # the original's stand-in for zero initialisation


_NORMS_IN_BF16 = False  # while any norms_in_bf16() is open (a bool: compiled code guards on its value)
_norms_in_bf16_open = 0
_norms_lock = threading.Lock()


@contextlib.contextmanager
def norms_in_bf16():
    """Within it, GroupNorm normalises bf16 activations in bf16 (the kernel still accumulates its
    statistics in fp32), where CUDA autocast would run it in fp32: an upcast before each norm and a
    downcast at the next convolution, two extra passes over the activations per norm. On a CPU, autocast
    already does this; there only the norm's weights round to bf16.

    The mode is the process's, not the thread's (compiled code can guard on a global, not on a thread's
    state): another thread's bf16 network running meanwhile gets it too. It ends when the last one closes."""
    global _NORMS_IN_BF16, _norms_in_bf16_open
    with _norms_lock:
        _norms_in_bf16_open += 1
        _NORMS_IN_BF16 = True
    try:
        yield
    finally:
        with _norms_lock:
            _norms_in_bf16_open -= 1
            _NORMS_IN_BF16 = _norms_in_bf16_open > 0


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _NORMS_IN_BF16 and x.dtype == torch.bfloat16:
            with torch.autocast(x.device.type, enabled=False):  # CUDA's kernel wants weights of x's dtype
                weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return super().forward(x)


def group_norm(channels: int, num_groups: int) -> GroupNorm:
    return GroupNorm(num_groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = conv(in_ch, out_ch)
        self.temb_proj = linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, scale=ZERO)
        self.nin_shortcut = conv(in_ch, out_ch, kernel=1, padding=0) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(ch, num_groups)
        self.q = conv(ch, ch, kernel=1, padding=0)
        self.k = conv(ch, ch, kernel=1, padding=0)
        self.v = conv(ch, ch, kernel=1, padding=0)
        self.proj_out = conv(ch, ch, kernel=1, padding=0, scale=ZERO)
        self.cross: CrossAttention | None = None  # text-conditional U-Nets attach one after construction

    def forward(self, x: torch.Tensor, text: TextEncoding | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1 head, H*W, C]; the default scale of SDPA is C^-0.5, as in the paper.
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(2, 3) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        x = x + self.proj_out(h)
        return x if self.cross is None else self.cross(x, text)


class CrossAttention(nn.Module):
    """Attention from the image positions to text tokens (with the text's padding mask), residual, as
    the text-conditional U-Nets of GLIDE / Stable Diffusion add after self-attention. Heads of 32 channels."""

    def __init__(self, ch: int, context_dim: int, num_groups: int):
        super().__init__()
        self.heads = max(1, ch // 32)
        self.norm = group_norm(ch, num_groups)
        self.q = conv(ch, ch, kernel=1, padding=0)
        self.k = linear(context_dim, ch)
        self.v = linear(context_dim, ch)
        self.proj_out = conv(ch, ch, kernel=1, padding=0, scale=ZERO)

    def forward(self, x: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, d = self.heads, C // self.heads
        q = self.q(self.norm(x)).reshape(B, heads, d, H * W).transpose(2, 3)  # [B, heads, HW, d]
        tokens = text.tokens.to(x.dtype)
        k, v = (p(tokens).reshape(B, -1, heads, d).transpose(1, 2) for p in (self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=text.mask[:, None, None, :])
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TensorFlow 'SAME' padding, or 2x2 average pooling."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = conv(ch, ch, stride=2, padding=0) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # 'SAME': total padding (ceil(n/2) - 1) * 2 + 3 - n, the smaller half before. On even n that is
        # 0 before and 1 after; symmetric padding would shift the sampling grid by one pixel.
        pads = []
        for n in (x.shape[3], x.shape[2]):
            total = max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        return self.conv(F.pad(x, pads))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 conv."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = conv(ch, ch) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, optional attention after each, and a resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    """The DDPM U-Net. ``model(x, t)`` maps images [B, C, H, W] and timesteps [B] to [B, out_ch, H, W].

    With ``num_classes`` > 0 it is class-conditional: ``model(x, t, y)`` with ``ClassIds`` y (or their
    tensor [B]) in 0..num_classes, where id ``num_classes`` is the reserved "null" class (no condition,
    what y None gives; what condition dropout trains and classifier-free guidance contrasts with). The
    class embedding is added to the time embedding. With num_classes = 0 (the default) the network is
    exactly the paper's.

    With ``low_res_channels`` > 0 it is a super-resolution stage of a cascade: ``model(x, t, low)`` with a
    ``LowResImage`` whose (upsampled, noised) image is concatenated to x and whose augmentation level is
    embedded like a timestep and added to the time embedding."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resolution: int = 32,
        resamp_with_conv: bool = True,
        num_groups: int = 32,
        num_classes: int = 0,
        context_dim: int = 0,
        low_res_channels: int = 0,
        pooled_dim: int = 0,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.ch = ch
        temb_ch = 4 * ch
        self.temb_dense0 = linear(ch, temb_ch)
        self.temb_dense1 = linear(temb_ch, temb_ch)
        self.conv_in = conv(in_channels + low_res_channels, ch)

        def res(i, o):
            return ResBlock(i, o, temb_ch, dropout, num_groups)

        def attn_or_none(c, res_now):
            return AttnBlock(c, num_groups) if res_now in attn_resolutions else nn.Identity()

        # Down path: every block output (and every downsample output) is pushed on the skip stack.
        skip_channels = [ch]
        self.down = nn.ModuleList()
        cur_ch, cur_res = ch, resolution
        for level, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res(cur_ch, ch * mult))
                cur_ch = ch * mult
                attns.append(attn_or_none(cur_ch, cur_res))
                skip_channels.append(cur_ch)
            last = level == len(ch_mult) - 1
            resample = None if last else Downsample(cur_ch, resamp_with_conv)
            if not last:
                skip_channels.append(cur_ch)
                cur_res //= 2
            self.down.append(Level(blocks, attns, resample))

        self.mid_block1 = res(cur_ch, cur_ch)
        self.mid_attn = AttnBlock(cur_ch, num_groups)
        self.mid_block2 = res(cur_ch, cur_ch)

        # Up path: num_res_blocks + 1 blocks per level, each on concat([h, skip.pop()]).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(cur_ch + skip_channels.pop(), ch * mult))
                cur_ch = ch * mult
                attns.append(attn_or_none(cur_ch, cur_res))
            resample = Upsample(cur_ch, resamp_with_conv) if level != 0 else None
            if level != 0:
                cur_res *= 2
            self.up.append(Level(blocks, attns, resample))
        assert not skip_channels

        self.norm_out = group_norm(cur_ch, num_groups)
        self.conv_out = conv(cur_ch, out_channels, scale=ZERO)
        # Made last, so that every other weight is initialised as in the unconditional network.
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, temb_ch) if num_classes > 0 else None
        if num_classes and context_dim:
            raise ValueError("a U-Net is conditioned on classes or on text, not both")
        # Text: cross-attention after every self-attention, and the pooled text embedding added to the
        # time embedding. Also made last, in the order of the attention blocks.
        self.context_dim = context_dim
        self.text_pool = linear(pooled_dim or context_dim, temb_ch) if context_dim else None
        if context_dim:
            for block in self.modules():
                if isinstance(block, AttnBlock):
                    block.cross = CrossAttention(block.q.in_channels, context_dim, num_groups)
        self.low_res_channels = low_res_channels
        self.level_embed = None
        if low_res_channels:
            if num_classes or context_dim:
                raise ValueError("a super-resolution U-Net takes no class or text condition")
            self.level_embed = nn.Sequential(linear(ch, temb_ch), nn.SiLU(), linear(temb_ch, temb_ch))

    def condition(self, y: Condition | torch.Tensor | None, n: int, device) -> Condition | None:
        """``y`` as the condition this network takes (what the network is decides, not what ``y`` is),
        one row for each of ``n`` examples: ClassIds for a class-conditional U-Net (a tensor of ids or one
        id is wrapped; None is the null class), a TextEncoding for a text-conditional one, a LowResImage for
        a super-resolution stage, None for an unconditional one. Any other is a ValueError."""
        if self.class_embed is not None:
            if y is None:  # no condition: the null class
                return ClassIds(torch.full((n,), self.num_classes, device=device, dtype=torch.long))
            if isinstance(y, torch.Tensor):  # class ids as a bare tensor, as before ClassIds
                y = ClassIds.of(y)
            takes, hint = ClassIds, "class-conditional: give ClassIds (or a tensor of class ids)"
        elif self.text_pool is not None:  # the null text is the encoder's "", which only it knows
            takes, hint = TextEncoding, 'text-conditional: give a TextEncoding (of "" for none)'
        elif self.level_embed is not None:
            takes, hint = LowResImage, "a super-resolution stage: give a LowResImage"
        elif y is None:
            return None
        else:
            raise ValueError("this U-Net is unconditional; it takes no condition")
        if not isinstance(y, takes):
            raise ValueError(f"this U-Net is {hint}, got {type(y).__name__}")
        return y.repeat_to(n)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: Condition | torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[-2:] != (self.resolution, self.resolution):
            # Attention placement was fixed for `resolution`; another size would silently move it.
            raise ValueError(
                f"this U-Net was built for {self.resolution}x{self.resolution} inputs, got {x.shape}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.ch).to(x.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        y = self.condition(y, x.shape[0], x.device)
        text = None
        if self.class_embed is not None:
            temb = temb + self.class_embed(y.ids).to(temb.dtype)
        elif self.text_pool is not None:
            text = y
            temb = temb + self.text_pool(text.pooled.to(temb.dtype))
        elif self.level_embed is not None:
            if y.image.shape[1] != self.low_res_channels or y.image.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"a low-resolution condition of shape {tuple(y.image.shape)} for inputs {tuple(x.shape)}"
                )
            x = torch.cat([x, y.image.to(x.dtype)], dim=1)
            level = timestep_embedding(y.level, self.ch).to(temb.dtype)
            temb = temb + self.level_embed(level)

        def attend(attn, h):
            return attn(h) if text is None or isinstance(attn, nn.Identity) else attn(h, text)

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns, strict=True):
                hs.append(attend(attn, block(hs[-1], temb)))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = hs[-1]
        h = self.mid_block2(attend(self.mid_attn, self.mid_block1(h, temb)), temb)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attend(attn, block(torch.cat([h, hs.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))
