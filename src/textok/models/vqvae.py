"""A convolutional VQ autoencoder over multi-scale residual codes: the layout of VAR's released VQVAE.

    image (B, 3, H, W) -> CNN encoder (H / 2^(levels-1) per side) -> 3x3 quant conv -> K x K map of C channels
      -> multi-scale residual quantizer (one branch; VAR's scales 1,2,3,4,5,6,8,10,13,16, the nearest of 4096
         codes by Euclidean distance, 4 shared phi convs) -> f_hat -> 3x3 post-quant conv -> CNN decoder -> image

The encoder and decoder are the latent-diffusion / taming autoencoder of :mod:`.cnn_autoencoder` (ResNet blocks
with GroupNorm(32) and SiLU, single-head attention blocks at the lowest resolution and in the middle, stride-2 convs
down, nearest x2 + conv up). The quantizer is textok's :class:`~textok.models.multiscale.ProductQuantizer` with one
branch, so the codes are (B, 1, L), L = sum(pn^2), and a :class:`~textok.models.var.VAR` with ``branches=1``
samples them.

The tokenizer API is ImageFolder's: ``encode`` / ``decode`` (f_hat tokens (B, K^2, C)), ``encode_codes``,
``decode_codes`` (any prefix of the scales), ``codes_per_scale``, ``teacher_forcing_inputs``, ``forward`` ->
(reconstruction, f_hat), ``training_losses``. There is no text: ``text`` arguments must be None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, derived
from ..errors import ConfigError
from ..hub import PretrainedMixin
from .cnn_autoencoder import GROUPS, Decoder, Encoder, GridTokenizer
from .multiscale import VAR_SCALES, MultiScaleCodes, MultiScaleQuantizerConfig, ProductQuantizer


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


class VQVAE(MultiScaleCodes, GridTokenizer, PretrainedMixin, nn.Module):
    """CNN encoder -> one-branch multi-scale residual quantizer -> CNN decoder. Codes (B, 1, L) int64, scale by
    scale, row-major per scale; f_hat tokens (B, K^2, C)."""

    config_class = VQVAEConfig
    model_type = "vqvae"
    config: VQVAEConfig
    display_name, tokens_are = "VQVAE", "f_hat tokens"

    def __init__(self, config: VQVAEConfig) -> None:
        if not isinstance(config, VQVAEConfig):
            raise ConfigError(f"VQVAE needs a VQVAEConfig, got {type(config).__name__} (see VQVAEConfig.presets())")
        super().__init__()
        self.config = config
        k = config.quant_conv_kernel
        widths, code_dim = [config.ch * m for m in config.ch_mult], config.quantizer.code_dim
        attention = dict(level_attention=config.level_attention, mid_attention=config.mid_attention)
        self.encoder = Encoder(config.ch, widths, config.num_res_blocks, code_dim, **attention)
        self.decoder = Decoder(code_dim, widths, config.num_res_blocks, **attention)
        self.quant_conv = nn.Conv2d(config.quantizer.code_dim, config.quantizer.code_dim, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(config.quantizer.code_dim, config.quantizer.code_dim, k, padding=k // 2)
        self.quantizer = ProductQuantizer(config.quantizer)

    # ---- what generators need to know ---------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return 1

    # ---- the API --------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor, text: None = None) -> Tensor:
        """images -> unquantized latents (B, K^2, C) (after the quant conv)."""
        self._no_text(text)
        self._check_images(images)
        return self.quant_conv(self.encoder(images)).flatten(2).transpose(1, 2)

    def decode(self, z: Tensor, text: None = None) -> Tensor:
        """f_hat tokens (B, K^2, C) -> images (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        self._no_text(text)
        self._check_tokens(z)
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

    # ---- accounting -----------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {**self._part_counts(), "quantizer": count(self.quantizer), "total": count(self)}

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
