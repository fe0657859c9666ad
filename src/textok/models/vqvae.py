"""A convolutional VQ autoencoder over multi-scale residual codes: the layout of VAR's released VQVAE.

    image (B, 3, H, W) -> CNN encoder (H / 2^(levels-1) per side) -> 3x3 quant conv -> K x K map of C channels
      -> multi-scale residual quantizer (one branch; VAR's scales 1,2,3,4,5,6,8,10,13,16, the nearest of 4096
         codes by Euclidean distance, 4 shared phi convs) -> f_hat -> 3x3 post-quant conv -> CNN decoder -> image

The encoder and decoder are the latent-diffusion / taming autoencoder (ResNet blocks with GroupNorm(32) and SiLU,
single-head attention blocks at the lowest resolution and in the middle, stride-2 convs down, nearest x2 + conv
up). The quantizer is textok's :class:`~textok.models.multiscale.ProductQuantizer` with one branch, so the codes
are (B, 1, L), L = sum(pn^2), and a :class:`~textok.models.var.VAR` with ``branches=1`` samples them.

The tokenizer API is ImageFolder's: ``encode`` / ``decode`` (f_hat tokens (B, K^2, C)), ``encode_codes``,
``decode_codes`` (any prefix of the scales), ``codes_per_scale``, ``teacher_forcing_inputs``, ``forward`` ->
(reconstruction, f_hat), ``training_losses``. There is no text: ``text`` arguments must be None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, derived
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from .multiscale import VAR_SCALES, MultiScaleCodes, MultiScaleQuantizerConfig, ProductQuantizer
from .textok import check_values

GROUPS = 32  # GroupNorm groups of every norm (the layout's fixed choice)


def _var_quantizer() -> MultiScaleQuantizerConfig:
    return MultiScaleQuantizerConfig(scales=VAR_SCALES, branches=1, num_codes=4096, code_dim=32, beta=0.25,
                                     phi_convs=4, phi_ratio=0.5, dropout=0.0, match="euclidean")


@dataclasses.dataclass
class VQVAEConfig(Config):
    """The autoencoder's widths and depth, and its quantizer (one branch; the last scale is the latent grid)."""

    image_size: int = 256
    ch: int = 160  # width of the first level; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; each level but the last halves the side
    num_res_blocks: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    level_attention: bool = True  # attention after every block of the lowest-resolution level
    mid_attention: bool = True  # attention between the two middle blocks
    quant_conv_kernel: int = 3  # the convs before and after the quantizer
    quantizer: MultiScaleQuantizerConfig = field(default_factory=_var_quantizer)
    num_tokens: int = derived(256, "image_size, ch_mult")  # K^2 f_hat positions the decoder reads
    token_channels: int = derived(32, "quantizer.code_dim")

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult) or self.ch < 1 or self.num_res_blocks < 1:
            raise ConfigError("ch, ch_mult (a non-empty list) and num_res_blocks must be positive")
        if any((self.ch * m) % GROUPS for m in self.ch_mult):
            raise ConfigError(f"every level width ch * ch_mult ({[self.ch * m for m in self.ch_mult]}) must be a "
                              f"multiple of {GROUPS} (GroupNorm groups)")
        if self.quant_conv_kernel < 1 or self.quant_conv_kernel % 2 == 0:
            raise ConfigError(f"quant_conv_kernel={self.quant_conv_kernel} must be odd and positive")
        q = self.quantizer
        if q.branches != 1:
            raise ConfigError(f"a VQVAE quantizes one map: quantizer.branches must be 1, got {q.branches}")
        if self.image_size % self.patch_size or self.image_size // self.patch_size != q.scales[-1]:
            raise ConfigError(f"image_size {self.image_size} / downsampling {self.patch_size} must equal the last "
                              f"quantizer scale {q.scales[-1]} (the latent grid)")
        self.num_tokens = q.scales[-1] ** 2
        self.token_channels = q.code_dim

    # What the tokenizer verbs read of every tokenizer's config.
    @property
    def patch_size(self) -> int:
        """Pixels per latent cell along a side: 2^(levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_grid(self) -> int:
        return self.quantizer.scales[-1]

    uses_text = False
    text_in_encoder = False
    text_in_decoder = False
    text_encoder = "none"


def _register_presets() -> None:
    # VAR's released VQVAE (vae_ch160v4096z32.pth): 256 px, 16 x 16 x 32 latents, 4096 codes, 10 scales.
    VQVAEConfig.register_preset("var-vqvae-256")(lambda: VQVAEConfig())
    # The same layout at a CPU test size: 64 px, a 4 x 4 grid of 8 channels, 64 codes, 4 scales.
    VQVAEConfig.register_preset("vqvae-tiny")(lambda: VQVAEConfig(
        image_size=64, ch=32, quantizer=MultiScaleQuantizerConfig(scales=(1, 2, 3, 4), branches=1, num_codes=64,
                                                                  code_dim=8, dropout=0.0, match="euclidean")))


_register_presets()


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 conv on the skip when the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a map, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
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

    def __init__(self, widths: list[tuple[int, int]], attention: bool, resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in widths)
        self.attn = nn.ModuleList(AttnBlock(b) for _, b in widths) if attention else nn.ModuleList()
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
    def __init__(self, channels: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n, widths = len(cfg.ch_mult), [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        levels, cin = [], cfg.ch
        for i, w in enumerate(widths):
            pairs = [(cin if j == 0 else w, w) for j in range(cfg.num_res_blocks)]
            last = i == n - 1
            levels.append(Level(pairs, last and cfg.level_attention, None if last else Downsample(w), "downsample"))
            cin = w
        self.down = nn.ModuleList(levels)
        self.mid = Middle(cin, cfg.mid_attention)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.quantizer.code_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n, widths = len(cfg.ch_mult), [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.quantizer.code_dim, cin, 3, padding=1)
        self.mid = Middle(cin, cfg.mid_attention)
        levels: list[Level] = []
        for i in reversed(range(n)):  # built from the lowest resolution up; stored in resolution order
            w = widths[i]
            pairs = [(cin if j == 0 else w, w) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(pairs, i == n - 1 and cfg.level_attention, Upsample(w) if i else None, "upsample"))
            cin = w
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(MultiScaleCodes, PretrainedMixin, nn.Module):
    """CNN encoder -> one-branch multi-scale residual quantizer -> CNN decoder. Codes (B, 1, L) int64, scale by
    scale, row-major per scale; f_hat tokens (B, K^2, C)."""

    config_class = VQVAEConfig
    model_type = "vqvae"
    config: VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        if not isinstance(config, VQVAEConfig):
            raise ConfigError(f"VQVAE needs a VQVAEConfig, got {type(config).__name__} (see VQVAEConfig.presets())")
        super().__init__()
        self.config = config
        k = config.quant_conv_kernel
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.quantizer.code_dim, config.quantizer.code_dim, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(config.quantizer.code_dim, config.quantizer.code_dim, k, padding=k // 2)
        self.quantizer = ProductQuantizer(config.quantizer)

    # ---- what generators need to know ---------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return 1

    # ---- checks ---------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise TextokError(f"images have shape {tuple(getattr(images, 'shape', ()))} but this VQVAE takes (batch, "
                              f"3, {s}, {s}) in [-1, 1]; resize them (textok's loaders do)")
        if not images.is_floating_point():
            raise TextokError(f"images are {images.dtype}, not float: convert them to [-1, 1]")
        if not self.training:
            check_values(images, "images", expect_unit_range=True)

    @staticmethod
    def _no_text(text: object) -> None:
        if text is not None:
            raise TextokError("this VQVAE takes no text: drop the captions")

    def _to_map(self, tokens: Tensor) -> Tensor:
        K = self.config.latent_grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, K, K)

    # ---- the API --------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor, text: None = None) -> Tensor:
        """images -> unquantized latents (B, K^2, C) (after the quant conv)."""
        self._no_text(text)
        self._check_images(images)
        return self.quant_conv(self.encoder(images)).flatten(2).transpose(1, 2)

    def decode(self, z: Tensor, text: None = None) -> Tensor:
        """f_hat tokens (B, K^2, C) -> images (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        self._no_text(text)
        c = self.config
        if not isinstance(z, Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (c.num_tokens, c.token_channels):
            raise TextokError(f"tokens have shape {tuple(getattr(z, 'shape', ()))} but this VQVAE decodes (batch, "
                              f"{c.num_tokens}, {c.token_channels}) f_hat tokens")
        return self.decoder(self.post_quant_conv(self._to_map(z)))

    def forward(self, images: Tensor, text: None = None) -> tuple[Tensor, Tensor]:
        """Reconstruct from all scales: returns (reconstruction, f_hat tokens)."""
        zq = self.encode(images, text)
        return self.decoder(self.post_quant_conv(self._to_map(zq))), zq

    def training_losses(self, images: Tensor, text: None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction, terms): the VQ loss (``quantizer``) and code usage metrics, for the training loop."""
        out = self.quantizer(self.encode_latents(images, text))
        recon = self.decoder(self.post_quant_conv(self._to_map(out.quantized)))
        return recon, {"quantizer": out.losses["loss"], "metric/codebook_usage": out.metrics["usage"].detach(),
                       "metric/perplexity": out.metrics["perplexity"].detach()}

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    # ---- accounting -----------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder) + count(self.quant_conv),
                "decoder": count(self.decoder) + count(self.post_quant_conv),
                "quantizer": count(self.quantizer), "total": count(self)}

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """Forward FLOPs (2 x multiply-adds) of encoder, decoder (counted on a meta copy) and code matching."""
        c = self.config
        with torch.device("meta"):
            twin = VQVAE(c)
            x = torch.empty(1, 3, c.image_size, c.image_size)
            with FlopCounterMode(display=False) as counter:
                z = twin.quant_conv(twin.encoder(x))
                twin.decoder(twin.post_quant_conv(z))
        q = c.quantizer
        return float(counter.get_total_flops()) + 2.0 * q.codes_per_branch * q.num_codes * q.code_dim


__all__ = ["VQVAE", "VQVAEConfig"]
