"""TexTok: text-conditioned image tokenization (Zha et al., CVPR 2025).

Encoder (a ViT)::

    [ patch tokens of the image (P) | N learnable latent tokens | projected text tokens (L) ]
        -> transformer -> keep the N latent outputs -> Linear(width -> d)  =  Z  (B, N, d)

Decoder (a ViT)::

    [ P learnable patch (mask) tokens | Linear(d -> width)(Z) | projected text tokens (L) ]
        -> transformer -> keep the P patch outputs -> Linear(width -> p*p*3) -> unpatchify -> image

The text tokens are per-token states of a frozen text encoder (T5 in the paper, all-MiniLM-L6-v2 by
default here), projected to each ViT's width; padded text positions are masked out of attention. Text can
be switched off on either side (``text_in_encoder`` / ``text_in_decoder``); with both off this is the
paper's no-text baseline, a TiTok-style continuous 1D tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from ..text.embeddings import TextEmbeddings
from ..text.encoders import DEFAULT_TEXT_ENCODER, load_text_encoder
from .vit import GELU_KINDS, PatchEmbed, Transformer, ViTConfig, init_vit_weights, transformer_flops, unpatchify, vit_size

TextInput = list[str] | tuple[str, ...] | TextEmbeddings | None


@dataclasses.dataclass
class TexTokConfig(Config):
    """Everything that shapes a TexTok model (and nothing about training)."""

    image_size: int = 256
    patch_size: int = 16
    num_tokens: int = 32  # N, the number of 1D image tokens
    token_channels: int = 8  # d, channels per token
    encoder: ViTConfig = field(default_factory=lambda: vit_size("base"))
    decoder: ViTConfig = field(default_factory=lambda: vit_size("base"))
    text_in_encoder: bool = True
    text_in_decoder: bool = True
    text_encoder: str = DEFAULT_TEXT_ENCODER  # "minilm" | "t5:/local/dir" | "hf:/local/dir"
    text_dim: int = 384  # width of the text encoder's states (384 MiniLM, 2048 T5-XL, 4096 T5-XXL)
    text_max_length: int = 64  # captions are truncated to this many text tokens (with a warning)
    text_pooled: bool = False  # one text token per caption (the masked mean of its states) instead of one per word
    # Layout options that published checkpoints (1d-tokenizer's TiTok family, read by textok.convert) were
    # trained with; the defaults are textok's own layout. Left out of to_dict() while they hold their defaults.
    class_token: bool = False  # one learned token (with its position) before the patches, dropped from outputs
    norm_pre: bool = False  # a LayerNorm over the whole input sequence before the first block
    norm_eps: float = 1e-6  # every LayerNorm of both transformers
    gelu: str = "tanh"  # "tanh" (approximate) or "none" (exact erf GELU)
    legacy_token_layout: bool = False  # encoder head reads the (N, width) outputs as a (width, N) array
    pixel_conv: bool = False  # a 3x3 conv on the decoder's unpatchified image
    text_positions: int = 0  # >0: learned positions added to exactly that many projected text tokens (TA-TiTok)
    decoder_prefix_tokens: int = 0  # learned tokens after the decoder's class token, outputs dropped

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_tokens < 1 or self.token_channels < 1:
            raise ConfigError("num_tokens and token_channels must be positive")
        if self.gelu not in GELU_KINDS:
            raise ConfigError(f"gelu={self.gelu!r} is not one of {', '.join(GELU_KINDS)}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.text_positions < 0 or (self.text_positions and self.text_pooled):
            raise ConfigError(f"text_positions={self.text_positions} must be >= 0, and cannot go with text_pooled")
        if self.decoder_prefix_tokens < 0:
            raise ConfigError(f"decoder_prefix_tokens={self.decoder_prefix_tokens} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`, without the layout options that hold their defaults (so configs written
        before those options existed compare equal)."""
        data = super().to_dict()
        for name, default in LAYOUT_DEFAULTS.items():
            if data.get(name) == default:
                data.pop(name)
        return data

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in both sequences (the class token; the decoder adds decoder_prefix_tokens)."""
        return int(self.class_token)

    @property
    def uses_text(self) -> bool:
        return self.text_in_encoder or self.text_in_decoder

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


LAYOUT_DEFAULTS: dict[str, Any] = {"class_token": False, "norm_pre": False, "norm_eps": 1e-6, "gelu": "tanh",
                                   "legacy_token_layout": False, "pixel_conv": False, "text_positions": 0,
                                   "decoder_prefix_tokens": 0}


def _register_presets() -> None:
    # The paper's tokenizers: ViT-B encoder + ViT-B decoder (~176M parameters), N in {32, 64, 128, 256}.
    # Patch size 16 at both resolutions (our choice; the paper leaves it to its supplementary material).
    for res in (256, 512):
        for n in (32, 64, 128, 256):
            TexTokConfig.register_preset(f"textok-b-{res}-{n}")(
                lambda res=res, n=n: TexTokConfig(image_size=res, patch_size=16, num_tokens=n)
            )
    # Small CPU sizes: the study / demo family at 32-64 px, and the one the tests use.
    for res, patch in ((32, 4), (64, 8)):
        for n in (8, 16, 32, 64, 128):
            TexTokConfig.register_preset(f"textok-s-{res}-{n}")(
                lambda res=res, patch=patch, n=n: TexTokConfig(
                    image_size=res, patch_size=patch, num_tokens=n,
                    encoder=ViTConfig(width=128, depth=4, heads=4), decoder=ViTConfig(width=128, depth=4, heads=4),
                )
            )
    TexTokConfig.register_preset("textok-tiny")(
        lambda: TexTokConfig(image_size=16, patch_size=4, num_tokens=4, token_channels=4,
                             encoder=ViTConfig(width=32, depth=2, heads=2), decoder=ViTConfig(width=32, depth=2, heads=2))
    )
    # `make demo`: small enough to train twice in a few minutes on 2 CPU cores.
    TexTokConfig.register_preset("textok-demo")(
        lambda: TexTokConfig(image_size=32, patch_size=8, num_tokens=4,
                             encoder=ViTConfig(width=64, depth=2, heads=4), decoder=ViTConfig(width=64, depth=2, heads=4))
    )


_register_presets()


class TexTokEncoder(nn.Module):
    """Image (+ text) -> Z (B, N, d)."""

    def __init__(self, cfg: TexTokConfig) -> None:
        super().__init__()
        D = cfg.encoder.width
        self.num_patches, self.num_tokens = cfg.num_patches, cfg.num_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, D)
        self.patch_pos = nn.Parameter(torch.randn(1, cfg.num_patches, D) * D**-0.5)
        self.latent_tokens = nn.Parameter(torch.randn(1, cfg.num_tokens, D) * D**-0.5)
        self.latent_pos = nn.Parameter(torch.randn(1, cfg.num_tokens, D) * D**-0.5)
        self.text_proj = nn.Linear(cfg.text_dim, D) if cfg.text_in_encoder else None
        self.text_pos = _text_pos(cfg, D) if cfg.text_in_encoder else None
        self.class_token = nn.Parameter(torch.randn(1, 1, D) * D**-0.5) if cfg.class_token else None
        self.transformer = Transformer(cfg.encoder, cfg.norm_eps, cfg.gelu, cfg.norm_pre)
        self.to_tokens = nn.Linear(D, cfg.token_channels)
        self.legacy_token_layout = cfg.legacy_token_layout

    def latent_inputs(self) -> Tensor:
        """The (1, N, D) latent tokens as they enter the transformer (ImageFolder overrides the positions)."""
        return self.latent_tokens + self.latent_pos

    def forward(self, images: Tensor, text: TextEmbeddings | None) -> Tensor:
        B = images.shape[0]
        images = images.to(self.patch_pos.dtype)  # float64 / float16 input to a float32 model (autocast still applies)
        parts = [self.patch_embed(images) + self.patch_pos, self.latent_inputs().expand(B, -1, -1)]
        if self.class_token is not None:
            parts.insert(0, self.class_token.expand(B, -1, -1))
        start = self.num_patches + len(parts) - 2
        key_padding = None
        if self.text_proj is not None:
            assert text is not None
            parts.append(_project_text(self.text_proj, self.text_pos, text, self.patch_pos.dtype))
            if not text.dense:  # no padded caption: no mask (the same attention, a faster kernel)
                key_padding = torch.cat([text.mask.new_ones(B, start + self.num_tokens), text.mask], dim=1)
        h = self.transformer(torch.cat(parts, dim=1), key_padding)[:, start : start + self.num_tokens]
        if self.legacy_token_layout:  # the (B, N, width) memory read as (B, width, N), column n = token n
            h = h.reshape(B, -1, self.num_tokens).transpose(1, 2)
        return self.to_tokens(h)


class TexTokDecoder(nn.Module):
    """Z (B, N, d) (+ text) -> image (B, 3, H, W)."""

    def __init__(self, cfg: TexTokConfig) -> None:
        super().__init__()
        D = cfg.decoder.width
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.randn(1, 1, D) * D**-0.5)
        self.patch_pos = nn.Parameter(torch.randn(1, cfg.num_patches, D) * D**-0.5)
        self.token_proj = nn.Linear(cfg.token_channels, D)
        self.latent_pos = nn.Parameter(torch.randn(1, cfg.num_tokens, D) * D**-0.5)
        self.text_proj = nn.Linear(cfg.text_dim, D) if cfg.text_in_decoder else None
        self.text_pos = _text_pos(cfg, D) if cfg.text_in_decoder else None
        self.class_token = nn.Parameter(torch.randn(1, 1, D) * D**-0.5) if cfg.class_token else None
        n_prefix = cfg.decoder_prefix_tokens
        self.prefix_tokens = nn.Parameter(torch.randn(1, n_prefix, D) * D**-0.5) if n_prefix else None
        self.transformer = Transformer(cfg.decoder, cfg.norm_eps, cfg.gelu, cfg.norm_pre)
        self.to_pixels = nn.Linear(D, cfg.patch_size**2 * 3)
        self.pixel_conv = nn.Conv2d(3, 3, 3, padding=1) if cfg.pixel_conv else None

    def features(self, z: Tensor, text: TextEmbeddings | None) -> Tensor:
        """The transformer's outputs at the P patch positions (B, P, width), before the output head."""
        B, P = z.shape[0], self.cfg.num_patches
        z = z.to(self.patch_pos.dtype)
        parts = [(self.mask_token + self.patch_pos).expand(B, -1, -1), self.token_proj(z) + self.latent_pos]
        if self.prefix_tokens is not None:
            parts.insert(0, self.prefix_tokens.expand(B, -1, -1))
        if self.class_token is not None:
            parts.insert(0, self.class_token.expand(B, -1, -1))
        start = sum(part.shape[1] for part in parts[:-2])  # tokens before the patches
        key_padding = None
        if self.text_proj is not None:
            assert text is not None
            parts.append(_project_text(self.text_proj, self.text_pos, text, self.patch_pos.dtype))
            if not text.dense:
                key_padding = torch.cat([text.mask.new_ones(B, start + P + self.cfg.num_tokens), text.mask], dim=1)
        return self.transformer(torch.cat(parts, dim=1), key_padding)[:, start : start + P]

    def forward(self, z: Tensor, text: TextEmbeddings | None) -> Tensor:
        g = self.cfg.grid
        images = unpatchify(self.to_pixels(self.features(z, text)), self.cfg.patch_size, g, g)
        return images if self.pixel_conv is None else self.pixel_conv(images)



def _text_pos(cfg: TexTokConfig, width: int) -> nn.Parameter | None:
    """Learned positions of the text tokens (``text_positions`` > 0), or None."""
    if not cfg.text_positions:
        return None
    return nn.Parameter(torch.randn(1, cfg.text_positions, width) * width**-0.5)


def _project_text(proj: nn.Linear, pos: nn.Parameter | None, text: TextEmbeddings, dtype: torch.dtype) -> Tensor:
    """Text states projected to the transformer's width, plus their learned positions when the model has them."""
    states = proj(text.states.to(dtype))
    if pos is None:
        return states
    if states.shape[1] != pos.shape[1]:
        raise TextokError(f"this model takes exactly {pos.shape[1]} text tokens per caption (it learned their "
                          f"positions), got {states.shape[1]}; use its text encoder (a fixed-length one, e.g. clip:)")
    return states + pos


# Pixels further than this outside [-1, 1] are not a rounding overshoot: the images were scaled another way.
PIXEL_RANGE_SLACK = 1.0


def check_values(x: Tensor, what: str, expect_unit_range: bool = False) -> None:
    """Refuse NaN/inf values; warn when images look like 0-255 (or otherwise far outside [-1, 1]).

    One reduction and one read-back per call (min and max: NaN and inf show in them). The models call it
    outside training only, where that read-back would cost the loop a device sync every step (the loop checks
    its loss for NaN/inf instead), and not while torch.compile traces.
    """
    if x.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(list(torch.aminmax(x.detach()))).float().tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise TextokError(f"{what} contain NaN or inf values; check the data or the step that produced them")
    if expect_unit_range and (hi > 1 + PIXEL_RANGE_SLACK or lo < -1 - PIXEL_RANGE_SLACK):
        hint = " (they look like 0-255 pixels: x / 127.5 - 1)" if lo >= 0 and hi > 2 else ""
        warnings.warn(f"{what} range over [{lo:.4g}, {hi:.4g}] but textok expects [-1, 1]{hint}", stacklevel=3)


class TexTok(PretrainedMixin, nn.Module):
    """The tokenizer: ``encode(images, text) -> Z`` and ``decode(Z, text) -> images``.

    ``text`` is a list of captions (the configured frozen encoder is loaded lazily, once) or precomputed
    :class:`TextEmbeddings`; it may be omitted when text is switched off on the side being called.
    """

    config_class = TexTokConfig
    model_type = "textok"
    # What a generator models of this tokenizer (a models.kinds.CODE_FORMS key): TexTok's continuous tokens.
    code_form = "tokens"
    is_discrete = False

    def code_layout(self) -> dict | None:
        """How multi-scale codes are laid out (what a VAR must model); None for other code forms."""
        return None

    def __init__(self, config: TexTokConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TexTokEncoder(config)
        self.decoder = TexTokDecoder(config)
        self._init_weights()

    def _init_weights(self) -> None:
        init_vit_weights(self)

    # ---- text ----------------------------------------------------------------------------------
    def text_embeddings(self, text: TextInput, batch: int, needed: bool) -> TextEmbeddings | None:
        """Captions or embeddings -> embeddings on the model's device (``None`` when not needed)."""
        if not needed:
            return None
        if text is None:
            raise TextokError("this model is conditioned on text: pass one caption per image "
                              "(or a model with text_in_encoder=false text_in_decoder=false)")
        if not isinstance(text, TextEmbeddings):
            if isinstance(text, str):
                raise TextokError("text must be a list of captions, one per image, not a single string")
            text = load_text_encoder(self.config.text_encoder, self.config.text_max_length).encode(list(text))
        if len(text) != batch:
            raise TextokError(f"got {len(text)} captions for {batch} images: give exactly one caption per image")
        if text.dim != self.config.text_dim:
            raise TextokError(f"text embeddings are {text.dim}-d but the model expects text_dim={self.config.text_dim} "
                              f"(its text encoder is {self.config.text_encoder!r})")
        param = next(self.parameters())
        text = text.to(param.device)
        return text.pooled() if self.config.text_pooled else text

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        if not isinstance(images, Tensor):
            raise TextokError(f"images must be a float tensor (batch, 3, {c.image_size}, {c.image_size}) in [-1, 1], "
                              f"not a {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != c.image_size or images.shape[3] != c.image_size:
            raise TextokError(
                f"images have shape {tuple(images.shape)} but this model takes (batch, 3, {c.image_size}, "
                f"{c.image_size}) in [-1, 1]; resize/convert them (textok's loaders do) or use a {images.shape[-1]}-px config"
            )
        if not images.is_floating_point():
            raise TextokError(f"images are {images.dtype}, not float: convert them to [-1, 1] "
                              "(for 0-255 pixels: x.float() / 127.5 - 1)")
        if not self.training:
            check_values(images, "images", expect_unit_range=True)

    # ---- the API -------------------------------------------------------------------------------
    def encode(self, images: Tensor, text: TextInput = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> Z (B, N, d)."""
        self._check_images(images)
        emb = self.text_embeddings(text, images.shape[0], self.config.text_in_encoder)
        return self.encoder(images, emb)

    def decode(self, z: Tensor, text: TextInput = None) -> Tensor:
        """Z (B, N, d) -> images (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        c = self.config
        if not isinstance(z, Tensor) or z.dim() != 3 or z.shape[1:] != (c.num_tokens, c.token_channels):
            raise TextokError(f"tokens have shape {tuple(getattr(z, 'shape', ()))} but this model decodes (batch, "
                              f"{c.num_tokens}, {c.token_channels}) float tokens")
        if not z.is_floating_point():
            raise TextokError(f"tokens are {z.dtype}, not float: decode what encode() returned")
        if not self.training:
            check_values(z, "tokens")
        emb = self.text_embeddings(text, z.shape[0], self.config.text_in_decoder)
        return self.decoder(z, emb)

    def training_losses(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loop's entry point: (reconstruction, extra loss terms). TexTok has none;
        quantized siblings (TiTok) return their quantizer losses here."""
        recon, _ = self(images, text)
        return recon, {}

    def decode_right_and_wrong(self, images: Tensor, text: TextInput, wrong_text: TextInput) -> tuple[Tensor, Tensor]:
        """Reconstructions of the same tokens decoded with each image's caption and with ``wrong_text``: the
        pair a text-grounding loss compares (the decoder should do worse with another image's caption)."""
        c = self.config
        if not c.text_in_decoder:
            raise TextokError("decoding with another caption needs text in the decoder (text_in_decoder=true)")
        self._check_images(images)
        emb = self.text_embeddings(text, images.shape[0], True)
        wrong = self.text_embeddings(wrong_text, images.shape[0], True)
        z = self.encoder(images, emb if c.text_in_encoder else None)
        return self.decoder(z, emb), self.decoder(z, wrong)

    def forward(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, Tensor]:
        """Reconstruct: returns (reconstruction, Z). Text is encoded once and shared by both sides."""
        self._check_images(images)
        emb = self.text_embeddings(text, images.shape[0], self.config.uses_text)
        z = self.encoder(images, emb if self.config.text_in_encoder else None)
        return self.decoder(z, emb if self.config.text_in_decoder else None), z

    def last_layer(self) -> nn.Parameter:
        """The decoder's output projection, where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.decoder.to_pixels.weight

    # ---- accounting ----------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "decoder": count(self.decoder), "total": count(self)}

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """Forward FLOPs (2 x multiply-adds) of encoder + decoder for one image (matmuls only)."""
        c = self.config
        P, N = c.num_patches, c.num_tokens
        text_tokens = min(text_tokens, 1) if c.text_pooled else text_tokens
        enc_len = P + N + c.num_prefix + (text_tokens if c.text_in_encoder else 0)
        dec_len = P + N + c.num_prefix + c.decoder_prefix_tokens + (text_tokens if c.text_in_decoder else 0)
        patch = 2 * P * (3 * c.patch_size**2) * c.encoder.width
        out = 2 * P * c.decoder.width * 3 * c.patch_size**2
        text = 2 * text_tokens * c.text_dim * ((c.encoder.width if c.text_in_encoder else 0)
                                              + (c.decoder.width if c.text_in_decoder else 0))
        return transformer_flops(c.encoder, enc_len) + transformer_flops(c.decoder, dec_len) + patch + out + text
