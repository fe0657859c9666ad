"""Stable Diffusion's KL autoencoder (diffusers' ``AutoencoderKL`` as released in sd-vae-ft-ema / sd-vae-ft-mse, the
latent space of DiT-XL/2) as a tokenizer of continuous tokens.

    image (B, 3, H, W) -> CNN encoder (4 levels: H / 8 per side) -> 2 x 4 channels -> 1x1 quant conv
      -> [mean, log-variance] of a diagonal Gaussian -> tokens: its mean, the grid flattened row-major (B, (H/8)^2, 4)
    tokens (B, (H/8)^2, 4) -> 1x1 post-quant conv -> CNN decoder -> image

The encoder and decoder are the latent-diffusion CNN of :mod:`.cnn_autoencoder` (attention only in the middle,
``norm_num_groups`` GroupNorm groups). ``encode`` is deterministic: it returns the posterior mean, not a sample, as
1d-tokenizer's TiTok-VAE releases encode too; training (``training_losses``) samples from the posterior and adds
``kl_weight`` times its KL. Tokens are unscaled: Stable Diffusion's ``scaling_factor`` 0.18215 is not applied here,
so a generator over these tokens records the scale as its latents normalisation (mean 0, std 1 / 0.18215 for the
converted DiT), and ``decode`` takes the same unscaled tokens. There is no text: ``text`` arguments must be None.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, derived
from ..errors import ConfigError
from ..hub import PretrainedMixin
from .cnn_autoencoder import GROUPS, Decoder, Encoder, GridTokenizer
from .quantizers import DiagonalGaussian


@dataclasses.dataclass
class SDVAEConfig(Config):
    """The autoencoder's widths and depth in diffusers' terms; the latent grid is image_size / 2^(levels - 1)."""

    image_size: int = 256
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry; all but the last halve the side
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    latent_channels: int = 4
    norm_num_groups: int = GROUPS
    mid_attention: bool = True  # the attention between the two middle blocks (diffusers' mid_block_add_attention)
    kl_weight: float = 1e-6  # training: weight of the posterior's KL to N(0, I) (the latent-diffusion VAEs' 1e-6)
    num_tokens: int = derived(1024, "image_size, block_out_channels")  # latent grid cells, row-major
    token_channels: int = derived(4, "latent_channels")

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(w) for w in self.block_out_channels)
        if not self.block_out_channels or min(self.block_out_channels) < 1 or self.layers_per_block < 1 \
                or self.latent_channels < 1 or self.norm_num_groups < 1:
            raise ConfigError("block_out_channels (a non-empty list), layers_per_block, latent_channels and "
                              "norm_num_groups must be positive")
        if any(w % self.norm_num_groups for w in self.block_out_channels):
            raise ConfigError(f"every width in block_out_channels {list(self.block_out_channels)} must be a multiple "
                              f"of norm_num_groups={self.norm_num_groups}")
        if self.image_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of the downsampling {self.patch_size} "
                              f"(2 ^ (levels - 1) for {len(self.block_out_channels)} levels)")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight={self.kl_weight} must be >= 0")
        self.num_tokens = self.latent_grid**2
        self.token_channels = self.latent_channels

    # What the tokenizer verbs read of every tokenizer's config.
    @property
    def patch_size(self) -> int:
        """Pixels per latent cell along a side: 2^(levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_grid(self) -> int:
        return self.image_size // self.patch_size

    uses_text = False
    text_in_encoder = False
    text_in_decoder = False
    text_encoder = "none"


def _register_presets() -> None:
    # sd-vae-ft-ema / sd-vae-ft-mse: 32 x 32 x 4 latents at 256 px (DiT-XL/2-256), 64 x 64 x 4 at 512 px.
    SDVAEConfig.register_preset("sdvae-256")(lambda: SDVAEConfig())
    SDVAEConfig.register_preset("sdvae-512")(lambda: SDVAEConfig(image_size=512))
    # The same layout at a CPU test size: 4 levels (8x down), 32 px -> a 4 x 4 grid of 4 channels.
    SDVAEConfig.register_preset("sdvae-tiny")(lambda: SDVAEConfig(image_size=32, block_out_channels=(16, 32, 64, 64),
                                                                   norm_num_groups=8))


_register_presets()


class SDVAE(GridTokenizer, PretrainedMixin, nn.Module):
    """CNN encoder -> diagonal Gaussian over a latent grid -> CNN decoder. Tokens (B, K^2, C): the posterior mean,
    unscaled, the K x K grid row-major."""

    config_class = SDVAEConfig
    model_type = "sdvae"
    config: SDVAEConfig
    # What a generator models of this tokenizer (a models.kinds.CODE_FORMS key): continuous tokens.
    code_form = "tokens"
    is_discrete = False
    display_name, tokens_are = "SD VAE", "unscaled latents"

    def __init__(self, config: SDVAEConfig) -> None:
        if not isinstance(config, SDVAEConfig):
            raise ConfigError(f"SDVAE needs an SDVAEConfig, got {type(config).__name__} (see SDVAEConfig.presets())")
        super().__init__()
        self.config = config
        widths, C, groups = config.block_out_channels, config.latent_channels, config.norm_num_groups
        attention = dict(level_attention=False, mid_attention=config.mid_attention, groups=groups)
        self.encoder = Encoder(widths[0], widths, config.layers_per_block, 2 * C, **attention)
        self.decoder = Decoder(C, widths, config.layers_per_block, **attention)
        self.quant_conv = nn.Conv2d(2 * C, 2 * C, 1)
        self.post_quant_conv = nn.Conv2d(C, C, 1)
        self.posterior = DiagonalGaussian(C)

    def code_layout(self) -> None:
        """How multi-scale codes are laid out; None: this tokenizer has continuous tokens."""
        return None

    def _moments(self, images: Tensor, text: None) -> Tensor:
        """images -> (B, K^2, 2C): [mean, log-variance] of every latent cell."""
        self._no_text(text)
        self._check_images(images)
        return self.quant_conv(self.encoder(images)).flatten(2).transpose(1, 2)

    def _decode_map(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self._to_map(z)))

    # ---- the API --------------------------------------------------------------------------------------
    def encode(self, images: Tensor, text: None = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> the posterior mean (B, K^2, C), unscaled (deterministic)."""
        return self._moments(images, text)[..., : self.config.latent_channels]  # [mean, log-variance]: the mean

    def decode(self, z: Tensor, text: None = None) -> Tensor:
        """Unscaled tokens (B, K^2, C) -> images (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        self._no_text(text)
        self._check_tokens(z)
        return self._decode_map(z)

    def forward(self, images: Tensor, text: None = None) -> tuple[Tensor, Tensor]:
        """Reconstruct from the posterior mean: returns (reconstruction, tokens)."""
        z = self.encode(images, text)
        return self._decode_map(z), z

    def training_losses(self, images: Tensor, text: None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction of a posterior sample, terms): ``kl_weight`` x KL (``quantizer``), for the training loop."""
        out = self.posterior(self._moments(images, text), sample=True)
        kl = out.losses["kl"]
        return self._decode_map(out.latents), {"quantizer": self.config.kl_weight * kl, "metric/kl": kl.detach()}

    # ---- accounting -----------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        return {**self._part_counts(), "total": sum(p.numel() for p in self.parameters())}

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """Forward FLOPs (2 x multiply-adds) of encoder and decoder, counted on a meta copy."""
        c = self.config
        with torch.device("meta"):
            twin = SDVAE(c)
            x = torch.empty(1, 3, c.image_size, c.image_size)
            z = torch.empty(1, c.latent_channels, c.latent_grid, c.latent_grid)
            with FlopCounterMode(display=False) as counter:
                twin.quant_conv(twin.encoder(x))
                twin.decoder(twin.post_quant_conv(z))
        return float(counter.get_total_flops())


__all__ = ["SDVAE", "SDVAEConfig"]
