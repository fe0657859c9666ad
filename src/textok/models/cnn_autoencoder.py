"""The latent-diffusion / taming CNN encoder and decoder that VAR's VQVAE and Stable Diffusion's VAE share.

    encoder: 3x3 conv -> one level per width (ResNet blocks, single-head attention after each where the level has
             it, then a stride-2 conv, except at the last level) -> middle (block, attention, block) -> GroupNorm,
             SiLU, 3x3 conv to the latent channels
    decoder: 3x3 conv from the latent channels -> middle -> the levels from the lowest resolution up (one more
             ResNet block each, nearest x2 + conv between) -> GroupNorm, SiLU, 3x3 conv to RGB

ResNet blocks are x + conv(SiLU(GN(conv(SiLU(GN(x)))))) with a 1x1 conv on the skip when the width changes; every
GroupNorm has eps 1e-6. Module names follow the taming layout (``down.i.block.j``, ``mid.attn_1``), so VAR's
release loads under its own names; other releases are renamed onto them by their converter.
:class:`GridTokenizer` holds what the two tokenizers built on them share: their input checks and accounting.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TextokError
from .textok import check_values

GROUPS = 32  # the usual GroupNorm groups (VAR's fixed choice, Stable Diffusion's norm_num_groups)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 conv on the skip when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int = GROUPS) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a map (scaled by 1/sqrt(channels)), with a residual."""

    def __init__(self, channels: int, groups: int = GROUPS) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only, as the layout was trained


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResNet blocks (each followed by attention where the level has it), then a resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, resample: nn.Module | None, name: str,
                 groups: int = GROUPS) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in widths)
        self.attn = nn.ModuleList(AttnBlock(b, groups) for _, b in widths) if attention else nn.ModuleList()
        if resample is not None:
            self.add_module(name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


class Middle(nn.Module):
    def __init__(self, channels: int, attention: bool, groups: int = GROUPS) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images -> a map of ``out_channels`` at 1 / 2^(levels - 1) of the side. ``stem``: the first conv's width;
    ``widths``: each level's; ``num_res_blocks`` per level; attention after every block of the last level
    (``level_attention``) and in the middle (``mid_attention``)."""

    def __init__(self, stem: int, widths: Sequence[int], num_res_blocks: int, out_channels: int, *,
                 level_attention: bool, mid_attention: bool, groups: int = GROUPS) -> None:
        super().__init__()
        n = len(widths)
        self.conv_in = nn.Conv2d(3, stem, 3, padding=1)
        levels, cin = [], stem
        for i, w in enumerate(widths):
            pairs = [(cin if j == 0 else w, w) for j in range(num_res_blocks)]
            last = i == n - 1
            levels.append(Level(pairs, last and level_attention, None if last else Downsample(w), "downsample",
                                groups))
            cin = w
        self.down = nn.ModuleList(levels)
        self.mid = Middle(cin, mid_attention, groups)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """A map of ``in_channels`` -> images, 2^(levels - 1) times the side; the mirror of :class:`Encoder` with
    ``num_res_blocks + 1`` blocks per level, stored in resolution order (``up.0`` is the full resolution)."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_res_blocks: int, *, level_attention: bool,
                 mid_attention: bool, groups: int = GROUPS) -> None:
        super().__init__()
        n = len(widths)
        cin = widths[-1]
        self.conv_in = nn.Conv2d(in_channels, cin, 3, padding=1)
        self.mid = Middle(cin, mid_attention, groups)
        levels: list[Level] = []
        for i in reversed(range(n)):  # built from the lowest resolution up; stored in resolution order
            w = widths[i]
            pairs = [(cin if j == 0 else w, w) for j in range(num_res_blocks + 1)]
            levels.insert(0, Level(pairs, i == n - 1 and level_attention, Upsample(w) if i else None, "upsample",
                                   groups))
            cin = w
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["GROUPS", "AttnBlock", "Decoder", "Downsample", "Encoder", "Level", "Middle", "ResnetBlock", "Upsample"]


class GridTokenizer:
    """What a tokenizer made of this encoder and decoder (``encoder``, ``quant_conv``, ``post_quant_conv``,
    ``decoder``) over a K x K latent grid shares: images of the configured size in [-1, 1], no text, tokens
    (B, K^2, C) of the grid row-major, and the parameter count per part."""

    display_name: ClassVar[str]  # how messages name the model
    tokens_are: ClassVar[str]  # what decode() takes, as messages say it

    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size  # type: ignore[attr-defined]
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise TextokError(f"images have shape {tuple(getattr(images, 'shape', ()))} but this {self.display_name} "
                              f"takes (batch, 3, {s}, {s}) in [-1, 1]; resize them (textok's loaders do)")
        if not images.is_floating_point():
            raise TextokError(f"images are {images.dtype}, not float: convert them to [-1, 1]")
        if not self.training:  # type: ignore[attr-defined]
            check_values(images, "images", expect_unit_range=True)

    def _no_text(self, text: object) -> None:
        if text is not None:
            raise TextokError(f"this {self.display_name} takes no text: drop the captions")

    def _check_tokens(self, z: Tensor) -> None:
        c = self.config  # type: ignore[attr-defined]
        if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (c.num_tokens, c.token_channels):
            raise TextokError(f"tokens have shape {tuple(getattr(z, 'shape', ()))} but this {self.display_name} "
                              f"decodes (batch, {c.num_tokens}, {c.token_channels}) {self.tokens_are}")
        if not z.is_floating_point():
            raise TextokError(f"tokens are {z.dtype}, not float: decode what encode() returned")
        if not self.training:  # type: ignore[attr-defined]
            check_values(z, "tokens")

    def _to_map(self, tokens: Tensor) -> Tensor:
        """(B, K^2, C) row-major -> (B, C, K, K)."""
        K = self.config.latent_grid  # type: ignore[attr-defined]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, K, K)

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight  # type: ignore[attr-defined]

    def _part_counts(self) -> dict[str, int]:
        count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder, self.quant_conv),  # type: ignore[attr-defined]
                "decoder": count(self.decoder, self.post_quant_conv)}  # type: ignore[attr-defined]
