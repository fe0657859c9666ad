"""StyleGAN2-style image discriminator (the adversarial critic of the tokenizers).

TexTok trains its tokenizer with a StyleGAN discriminator of ~24M parameters at 256 px. This module
builds the StyleGAN2 residual discriminator (Karras et al. 2020, "resnet" architecture):

* ``fromRGB`` 1x1 conv at full resolution, then one residual block per halving of the resolution down to
  4x4. A block is ``conv3x3 -> lrelu -> blur+downsample -> conv3x3 -> lrelu`` on the main path and
  ``blur+downsample -> conv1x1`` (no bias) on the skip path; the two are summed and scaled by sqrt(0.5)
  so the variance does not grow with depth.
* Downsampling is a separable [1,3,3,1] FIR blur with stride 2 (anti-aliased, as StyleGAN2), applied
  *before* the 3x3 conv so that conv runs at the lower resolution (same parameters, 4x fewer FLOPs than
  a conv followed by pooling).
* Leaky ReLU with slope 0.2, followed by a sqrt(2) gain (StyleGAN's ``lrelu`` gain) that keeps
  activations at unit variance.
* The 4x4 epilogue: minibatch standard deviation (group size 4, batches of any size), conv3x3, fc, fc
  -> one logit per image.

Plain layers by default: the 1/sqrt(fan_in) scale is folded into the initial weights, and the
discriminator trains with AdamW at the tokenizer recipes' lr (1e-4, as MAGVIT's and 1d-tokenizer's
discriminators do). StyleGAN2's equalised learning rate (``equalized_lr=True``: weights stored ~N(0, 1) and
scaled at run time) computes the same function at init, but under Adam each update is then ~lr *relative to
the weight*, up to ~100x slower than a plain layer at the same lr; StyleGAN2 pairs it with lr ~2e-3. Use it
only with that lr (``optim.d_lr``).

Channels per resolution follow StyleGAN2: ``min(channel_base / res, channel_max) * channel_multiplier``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError, TextokError

_LRELU_GAIN = math.sqrt(2.0)


@dataclasses.dataclass
class DiscriminatorConfig(Config):
    """Size and options of the StyleGAN2 discriminator."""

    image_size: int = 256
    in_channels: int = 3
    channel_base: int = 16384  # channels at resolution r: min(channel_base / r, channel_max) * multiplier
    channel_max: int = 512
    channel_multiplier: float = 1.0
    mbstd_group: int = 4  # minibatch-stddev group size (0 disables the layer)
    mbstd_channels: int = 1  # number of stddev feature maps appended
    equalized_lr: bool = False  # True: StyleGAN2's run-time weight scaling; needs d_lr ~2e-3 (module docstring)
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)

    def __post_init__(self) -> None:
        s = self.image_size
        if s < 8 or s & (s - 1):
            raise ConfigError(f"discriminator image_size must be a power of two >= 8, got {s}")
        if self.mbstd_group < 0 or self.mbstd_channels < 1:
            raise ConfigError("mbstd_group must be >= 0 and mbstd_channels >= 1")
        if self.channel_multiplier <= 0:
            raise ConfigError(f"channel_multiplier must be > 0, got {self.channel_multiplier}")
        if len(self.blur_kernel) % 2:
            raise ConfigError(f"blur_kernel must have an even number of taps, got {self.blur_kernel}")
        self.blur_kernel = tuple(int(v) for v in self.blur_kernel)

    def channels(self, res: int) -> int:
        """Feature channels at spatial resolution ``res``."""
        return max(1, int(min(self.channel_base / res, self.channel_max) * self.channel_multiplier))


@DiscriminatorConfig.register_preset("stylegan-256")
def _stylegan_256() -> DiscriminatorConfig:
    # StyleGAN2 config-f channels at 256 px: 64,128,256,512,512,512,512 -> ~24.0M parameters (TexTok's size).
    return DiscriminatorConfig(image_size=256, channel_base=16384, channel_max=512)


@DiscriminatorConfig.register_preset("stylegan-512")
def _stylegan_512() -> DiscriminatorConfig:
    # StyleGAN2-ADA's 512 px setting (channel_base 32768): 64,128,256,512x5 -> ~29M parameters.
    return DiscriminatorConfig(image_size=512, channel_base=32768, channel_max=512)


@DiscriminatorConfig.register_preset("stylegan-small")
def _stylegan_small() -> DiscriminatorConfig:
    # 64 px GPU recipes, channels 64,128,256,256,256: 4.7M parameters.
    return DiscriminatorConfig(image_size=64, channel_base=4096, channel_max=256)


@DiscriminatorConfig.register_preset("stylegan-tiny")
def _stylegan_tiny() -> DiscriminatorConfig:
    # 32 px, channels 16,32,32,32: ~70k parameters, for CPU tests.
    return DiscriminatorConfig(image_size=32, channel_base=512, channel_max=32)


# ---- layers ----------------------------------------------------------------------------------------


class EqualConv2d(nn.Module):
    """Conv2d whose weight is scaled by 1/sqrt(fan_in) at run time (equalised lr) or at init."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, equalized: bool = True) -> None:
        super().__init__()
        scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) * (1.0 if equalized else scale))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.runtime_scale = scale if equalized else 1.0
        self.padding = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.runtime_scale if self.runtime_scale != 1.0 else self.weight
        return F.conv2d(x, w, self.bias, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with the same equalised-lr treatment as :class:`EqualConv2d`."""

    def __init__(self, in_f: int, out_f: int, bias: bool = True, equalized: bool = True) -> None:
        super().__init__()
        scale = 1.0 / math.sqrt(in_f)
        self.weight = nn.Parameter(torch.randn(out_f, in_f) * (1.0 if equalized else scale))
        self.bias = nn.Parameter(torch.zeros(out_f)) if bias else None
        self.runtime_scale = scale if equalized else 1.0

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * self.runtime_scale if self.runtime_scale != 1.0 else self.weight
        return F.linear(x, w, self.bias)


def lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU 0.2 with StyleGAN's sqrt(2) gain (keeps unit variance)."""
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


class BlurDown(nn.Module):
    """Anti-aliased 2x downsampling: separable FIR blur (normalised to sum 1) with stride 2."""

    def __init__(self, taps: tuple[int, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        k1 = torch.tensor(taps, dtype=torch.float32)
        k2 = torch.outer(k1, k1)
        self.register_buffer("kernel", (k2 / k2.sum())[None, None], persistent=False)
        self.pad = (len(taps) - 2) // 2  # even taps k: output = H/2 with padding (k-2)/2

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        k = self.kernel.to(dtype=x.dtype).expand(c, 1, -1, -1)
        return F.conv2d(x, k, stride=2, padding=self.pad, groups=c)


class DiscriminatorBlock(nn.Module):
    """Residual block: (conv, lrelu, blur-down, conv, lrelu) + (blur-down, 1x1 conv), times sqrt(0.5)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        eq = cfg.equalized_lr
        self.conv0 = EqualConv2d(in_ch, in_ch, 3, equalized=eq)
        self.down = BlurDown(cfg.blur_kernel)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, equalized=eq)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False, equalized=eq)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.skip(self.down(x))
        h = lrelu(self.conv0(x))
        h = lrelu(self.conv1(self.down(h)))
        return (h + skip) * math.sqrt(0.5)


def minibatch_stddev(x: Tensor, group_size: int, num_channels: int = 1) -> Tensor:
    """Append ``num_channels`` maps holding the feature stddev across a group of samples.

    Samples are grouped contiguously in groups of ``group_size``; when the batch is not a multiple of it
    the remainder joins the last full group (so no group has a degenerate single sample unless the whole
    batch is one image). Batches smaller than the group form one group. Vectorised with a one-hot
    (B, groups) matrix: no loop over samples.
    """
    B, C, H, W = x.shape
    if C % num_channels:
        raise TextokError(f"minibatch stddev: {C} channels are not divisible by mbstd_channels={num_channels}")
    G = max(1, min(group_size, B))
    num_groups = max(1, B // G)
    ids = torch.clamp(torch.arange(B, device=x.device) // G, max=num_groups - 1)
    onehot = F.one_hot(ids, num_groups).to(torch.float32)  # (B, n)
    counts = onehot.sum(0)[:, None]  # (n, 1)
    flat = x.float().reshape(B, -1)  # stats in float32 even under autocast
    mean = (onehot.t() @ flat) / counts  # (n, K)
    var = (onehot.t() @ (flat - mean[ids]).square()) / counts
    std = (var + 1e-8).sqrt().reshape(num_groups, num_channels, C // num_channels, H, W)
    std = std.mean(dim=(2, 3, 4))  # (n, F)
    y = std[ids].to(x.dtype)[:, :, None, None].expand(B, num_channels, H, W)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: images (B, C, S, S) in [-1, 1] -> logits (B,) in float32."""

    def __init__(self, cfg: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DiscriminatorConfig()
        eq = cfg.equalized_lr
        res = cfg.image_size
        self.from_rgb = EqualConv2d(cfg.in_channels, cfg.channels(res), 1, equalized=eq)
        blocks = []
        while res > 4:
            blocks.append(DiscriminatorBlock(cfg.channels(res), cfg.channels(res // 2), cfg))
            res //= 2
        self.blocks = nn.ModuleList(blocks)
        c4 = cfg.channels(4)
        extra = cfg.mbstd_channels if cfg.mbstd_group > 0 else 0
        self.conv = EqualConv2d(c4 + extra, c4, 3, equalized=eq)
        self.fc = EqualLinear(c4 * 16, c4, equalized=eq)
        self.out = EqualLinear(c4, 1, equalized=eq)

    def forward(self, images: Tensor) -> Tensor:
        cfg = self.cfg
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise TextokError(
                f"discriminator expects images of shape (B, {cfg.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if images.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise TextokError(
                f"discriminator built for {cfg.image_size}x{cfg.image_size} images got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize the images or set image_size={images.shape[-1]}"
            )
        x = lrelu(self.from_rgb(images))
        for block in self.blocks:
            x = block(x)
        if cfg.mbstd_group > 0:
            x = minibatch_stddev(x, cfg.mbstd_group, cfg.mbstd_channels)
        x = lrelu(self.conv(x))
        x = lrelu(self.fc(x.flatten(1)))
        return self.out(x).squeeze(1).float()


def num_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
