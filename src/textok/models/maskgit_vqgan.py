"""MaskGIT's VQGAN (Chang et al. 2022) as TiTok uses it: the frozen image tokenizer whose codes TiTok's
stage 1 learns to predict ("proxy codes") and whose decoder turns stage 2's predictions into pixels.

A taming-style conv autoencoder without the non-local (attention) layers, a codebook of 1024 codes x 256
channels, downsampling 16 (16 x 16 codes at 256 px)::

    image -> conv_in -> down[i].block[j] (ResBlocks, 2x avg-pool between levels) -> mid -> norm, SiLU,
          conv_out (1x1) -> nearest code (squared l2)  ->  (B, h, w) codes
    codes -> quantize.embedding -> conv_in -> mid -> up[i].block[j] (ResBlocks, 2x nearest + conv between
          levels, run from the deepest level up) -> norm, SiLU, conv_out -> image

Parameter names are those of the published checkpoint ``maskgit-vqgan-imagenet-f16-256.bin`` (released with
bytedance/1d-tokenizer, loaded there strictly by ``PretrainedTokenizer``): ``encoder.*``, ``decoder.*`` and
``quantize.embedding.weight``. Two behaviours of the original are kept because those weights were trained
with them:

* a ResBlock whose width changes adds a 1x1 projection of its *output* as the residual, not of its input
  (the JAX MaskGIT's ``ResBlock`` does this, and the PyTorch port kept it);
* the networks see images in [0, 1]. This module takes and returns textok's [-1, 1] and converts.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError, TextokError
from ..weights import read_state_dict

PUBLISHED_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
WHERE = (f"download {PUBLISHED_FILE} (1d-tokenizer's release on the Hugging Face Hub, fun-research/TiTok) "
         "to a local file and point vqgan_weights at it")


@dataclasses.dataclass
class MaskGITVQGANConfig(Config):
    """The VQGAN's shape. The default is the published f16-256 tokenizer; ``tiny`` is for CPU tests."""

    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; 2x down/up-sampling between levels
    num_res_blocks: int = 2
    z_channels: int = 256  # code vector width
    num_codes: int = 1024
    norm_groups: int = 32  # GroupNorm groups (the published model: 32)
    # False: decoder and codebook only (a converted TiTok checkpoint carries no VQGAN encoder; it decodes,
    # and cannot run stage 1, which needs the VQGAN's codes of images)
    with_encoder: bool = True

    def __post_init__(self) -> None:
        if not self.channel_mult or min(self.channel_mult) < 1 or self.hidden_channels < 1 or self.norm_groups < 1:
            raise ConfigError(f"vqgan.channel_mult {self.channel_mult}, hidden_channels and norm_groups must be "
                              "positive")
        if self.num_res_blocks < 1 or self.z_channels < 1 or self.num_codes < 2:
            raise ConfigError("vqgan.num_res_blocks, z_channels must be >= 1 and num_codes >= 2")

    def check(self) -> None:
        """Cross-field checks, run when a model is about to be built (not per override: ``hidden_channels=8
        norm_groups=4`` must work in either order)."""
        widths = {self.hidden_channels * m for m in self.channel_mult}
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(f"vqgan widths {sorted(widths)} must be multiples of "
                              f"vqgan.norm_groups={self.norm_groups}")

    @property
    def downsample(self) -> int:
        """Image side / code-grid side (16 for the published model)."""
        return 2 ** (len(self.channel_mult) - 1)


MaskGITVQGANConfig.register_preset("maskgit-vqgan-f16-256")(lambda: MaskGITVQGANConfig())
MaskGITVQGANConfig.register_preset("maskgit-vqgan-tiny")(
    lambda: MaskGITVQGANConfig(hidden_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, z_channels=8,
                               num_codes=32, norm_groups=4)
)


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    """Stride-1 "same" convolution (odd k: the original's asymmetric same-padding is symmetric here)."""
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        # The original's residual for a width change is a projection of h itself (see the module docstring).
        return h + (self.nin_shortcut(h) if self.nin_shortcut is not None else x)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) and, in the decoder, ``upsample_conv`` after a 2x resize."""

    def __init__(self, cin: int, cout: int, cfg: MaskGITVQGANConfig, upsample: bool = False) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, cfg.norm_groups)
                                   for j in range(cfg.num_res_blocks))
        self.upsample_conv = _conv(cout, cout, 3) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        h, mult, groups = cfg.hidden_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = _conv(3, h, 3, bias=False)
        ins = (1,) + tuple(mult)
        self.down = nn.ModuleList(_Level(h * ins[i], h * mult[i], cfg) for i in range(len(mult)))
        top = h * mult[-1]
        self.mid = nn.ModuleList(ResBlock(top, top, groups) for _ in range(cfg.num_res_blocks))
        self.norm_out = nn.GroupNorm(groups, top, eps=1e-6)
        self.conv_out = _conv(top, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            x = level(x)
            if i < len(self.down) - 1:
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        h, mult, groups = cfg.hidden_channels, cfg.channel_mult, cfg.norm_groups
        top = h * mult[-1]
        self.conv_in = _conv(cfg.z_channels, top, 3)
        self.mid = nn.ModuleList(ResBlock(top, top, groups) for _ in range(cfg.num_res_blocks))
        # up[i] is level i (i = 0 the finest); it is fed by level i + 1 and run deepest first.
        self.up = nn.ModuleList(_Level(h * mult[min(i + 1, len(mult) - 1)], h * mult[i], cfg, upsample=i > 0)
                                for i in range(len(mult)))
        self.norm_out = nn.GroupNorm(groups, h * mult[0], eps=1e-6)
        self.conv_out = _conv(h * mult[0], 3, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class _Codebook(nn.Module):
    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)


class MaskGITVQGAN(nn.Module):
    """The frozen MaskGIT-VQGAN. Images are (B, 3, H, W) in [-1, 1] with H, W multiples of ``downsample``.

    * ``encode_to_codes(images) -> (B, h, w)`` int64 codes (nearest code in squared l2, float32 distances);
    * ``decode_codes(codes) -> images``: codes (B, h, w) or (B, h*w) in raster order;
    * ``decode_logits(logits) -> images``: (B, num_codes, h, w) scores -> softmax-weighted code vectors ->
      decoder, differentiable (TiTok's stage 2 decodes its predictions this way);
    * ``from_file(path)`` / ``load_file(path)``: the published weights from a local file.

    Outputs are not clamped (the original clamps to [0, 1] only when it writes images).
    """

    def __init__(self, config: MaskGITVQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MaskGITVQGANConfig()
        config.check()
        self.encoder = Encoder(config) if config.with_encoder else None
        self.decoder = Decoder(config)
        self.quantize = _Codebook(config.num_codes, config.z_channels)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], config: MaskGITVQGANConfig | None = None) -> "MaskGITVQGAN":
        """Build (default: the published f16-256 shape), load ``path`` strictly, freeze."""
        model = cls(config)
        model.load_file(path)
        return model.requires_grad_(False).eval()

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def codebook(self) -> Tensor:
        return self.quantize.embedding.weight

    # ---- encoding -------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        f = self.config.downsample
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise TextokError(f"the VQGAN takes images (batch, 3, H, W) in [-1, 1] with H and W multiples of {f}; "
                              f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode_to_codes(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f) int64 in [0, num_codes)."""
        self._check_images(images)
        if self.encoder is None:
            raise TextokError("this MaskGIT-VQGAN has no encoder (vqgan.with_encoder=false: it came without one); "
                              "it decodes codes but cannot encode images")
        z = self.encoder((images + 1) / 2)
        B, C, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, C)
        codes = self.codebook().float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return dist.argmin(1).view(B, h, w)

    # ---- decoding -------------------------------------------------------------------------------
    def decode_latents(self, z: Tensor) -> Tensor:
        """Code vectors (B, z_channels, h, w) -> images in [-1, 1] (differentiable)."""
        return self.decoder(z) * 2 - 1

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w), or (B, h*w) for a square grid, -> images (B, 3, f*h, f*w) in [-1, 1]."""
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise TextokError(f"codes of shape {tuple(codes.shape)}: a flat code sequence must fill a square grid")
            codes = codes.view(codes.shape[0], side, side)
        if codes.dim() != 3 or codes.dtype.is_floating_point:
            raise TextokError(f"codes must be integer (batch, h, w) or (batch, h*w), got {tuple(codes.shape)} "
                              f"{codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise TextokError(f"codes must lie in [0, {self.num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
        return self.decode_latents(self.quantize.embedding(codes).permute(0, 3, 1, 2))

    def decode_logits(self, logits: Tensor) -> Tensor:
        """(B, num_codes, h, w) scores -> images: the softmax over codes weights the code vectors."""
        if logits.dim() != 4 or logits.shape[1] != self.num_codes:
            raise TextokError(f"logits must be (batch, {self.num_codes}, h, w), got {tuple(logits.shape)}")
        w = self.codebook()
        z = torch.einsum("bkhw,kc->bchw", logits.softmax(dim=1).to(w.dtype), w)
        return self.decode_latents(z)

    # ---- weights --------------------------------------------------------------------------------
    def load_file(self, path: str | os.PathLike[str]) -> None:
        """Load a state dict in the published key layout from ``.safetensors`` or a ``torch.save`` file
        (read with ``weights_only=True``); missing, unexpected or mis-shaped keys are one error line."""
        state = read_state_dict(path, "MaskGIT-VQGAN weights", WHERE)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} mis-shaped (e.g. {k}: {tuple(state[k].shape)} in the file, "
                             f"{tuple(own[k].shape)} here)")
            raise TextokError(f"{path} does not match the MaskGIT-VQGAN layout: {'; '.join(parts)}; give "
                              f"{PUBLISHED_FILE} or set vqgan.* to the file's architecture")
        self.load_state_dict(state, strict=True)

    # ---- accounting -----------------------------------------------------------------------------
    def conv_flops(self, part: str, image_size: int) -> float:
        """Forward conv FLOPs (2 x multiply-adds) of ``encoder`` or ``decoder`` for one image of that side."""
        counts: list[float] = []

        def hook(m: nn.Module, _inp: tuple, out: Tensor) -> None:
            counts.append(2.0 * out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])

        with torch.device("meta"):
            net = (Encoder if part == "encoder" else Decoder)(self.config)
            handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
            g = image_size // self.config.downsample
            net(torch.empty(1, 3, image_size, image_size) if part == "encoder"
                else torch.empty(1, self.config.z_channels, g, g))
        for h in handles:
            h.remove()
        return sum(counts)


__all__ = ["MaskGITVQGAN", "MaskGITVQGANConfig", "PUBLISHED_FILE"]
