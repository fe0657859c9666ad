"""TiTok: a 1D tokenizer with a vector-quantised bottleneck (Yu et al. 2024, "An Image is Worth 32 Tokens").

TiTok is TexTok's no-text baseline with a quantiser between encoder and decoder, so it is built from
TexTok's pieces rather than beside them::

    image -> TexTokEncoder -> (B, N, d) -> bottleneck -> (B, N, d) -> TexTokDecoder -> image

The bottleneck is :class:`~textok.models.quantizers.VectorQuantizer` (TiTok: 4096 codes of 12 channels,
l2-normalised), :class:`~textok.models.quantizers.DiagonalGaussian` (the KL/VAE variant: the encoder emits
2d channels, mean and log-variance) or nothing (kind="none"). ``d`` is ``quantizer.code_dim``;
``token_channels`` follows it and cannot be set on its own.

Text is off by default (TiTok). The inherited ``text_in_encoder`` / ``text_in_decoder`` switches work as in
TexTok: text in the decoder only is TA-TiTok-like (TA-TiTok uses CLIP text features; here it is whatever
``text_encoder`` is configured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, TextokError
from .quantizers import DiagonalGaussian, QuantizerConfig, VectorQuantizer, build_quantizer
from .textok import TextInput, TexTok, TexTokConfig
from .vit import ViTConfig, init_vit_weights, vit_size


@dataclasses.dataclass
class TiTokConfig(TexTokConfig):
    """TexTok's config plus the bottleneck; text off and 12 channels per token by default."""

    # Follows quantizer.code_dim (set in __post_init__); not a constructor/override/JSON key.
    token_channels: int = field(default=12, init=False)
    text_in_encoder: bool = False
    text_in_decoder: bool = False
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig.preset("titok-vq"))

    def __post_init__(self) -> None:
        self.token_channels = self.quantizer.code_dim
        super().__post_init__()

    @property
    def is_discrete(self) -> bool:
        return self.quantizer.kind == "vq"

    @property
    def encoder_channels(self) -> int:
        """Width of the encoder's output head: 2d (mean, log-variance) for the KL variant, else d."""
        return 2 * self.token_channels if self.quantizer.kind == "kl" else self.token_channels

    def override(self, assignments: list[str] | dict[str, Any]) -> "TiTokConfig":
        """As :meth:`Config.override`; ``token_channels=X`` is read as ``quantizer.code_dim=X``."""
        def rename(key: str) -> str:
            return "quantizer.code_dim" if key.strip() == "token_channels" else key

        if isinstance(assignments, dict):
            return super().override({rename(k): v for k, v in assignments.items()})
        return super().override([rename(a.split("=", 1)[0]) + "=" + a.split("=", 1)[1] if "=" in a else a
                                 for a in assignments])

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("token_channels", None)  # derived from quantizer.code_dim
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> "TiTokConfig":
        """As :meth:`Config.from_dict`; a ``token_channels`` key is accepted when it equals quantizer.code_dim."""
        data = dict(data)
        channels = data.pop("token_channels", None)
        cfg = super().from_dict(data, strict=strict)
        if channels is not None and channels != cfg.token_channels:
            raise ConfigError(
                f"token_channels={channels} but quantizer.code_dim={cfg.quantizer.code_dim}: in TiTok the token "
                "channels are the quantizer's code_dim; set quantizer.code_dim only"
            )
        return cfg


def _register_presets() -> None:
    # The paper's three tokenizers: width/depth/heads S 512/8/8, B 768/12/12, L 1024/24/16; patch 16 at
    # 256 px; VQ of 4096 l2-normalised codes x 12 channels.
    for size, letter, n in (("small", "s", 128), ("base", "b", 64), ("large", "l", 32)):
        TiTokConfig.register_preset(f"titok-{letter}-{n}")(
            lambda size=size, n=n: TiTokConfig(
                image_size=256, patch_size=16, num_tokens=n, encoder=vit_size(size), decoder=vit_size(size),
                quantizer=QuantizerConfig.preset("titok-vq"),
            )
        )
    # CPU sizes: the one the tests use, and a demo size (32 px, 16 tokens). The demo's codebook is smaller
    # than the paper's (1024 codes) because small data sets cannot keep 4096 codes in use, and it restarts
    # dead codes: a fresh model sends every image to the same few codes (its encoder output is dominated by
    # the shared latent tokens), and restarts are what break that collapse in a short CPU run.
    TiTokConfig.register_preset("titok-tiny")(
        lambda: TiTokConfig(
            image_size=16, patch_size=4, num_tokens=4,
            encoder=ViTConfig(width=32, depth=2, heads=2), decoder=ViTConfig(width=32, depth=2, heads=2),
            quantizer=QuantizerConfig(kind="vq", num_codes=64, code_dim=8, l2_normalized=True),
        )
    )
    TiTokConfig.register_preset("titok-s-32-16")(
        lambda: TiTokConfig(
            image_size=32, patch_size=4, num_tokens=16,
            encoder=ViTConfig(width=128, depth=4, heads=4), decoder=ViTConfig(width=128, depth=4, heads=4),
            quantizer=QuantizerConfig(kind="vq", num_codes=1024, code_dim=12, l2_normalized=True,
                                      dead_code_steps=100),
        )
    )


_register_presets()


class TiTok(TexTok):
    """TexTok's encoder and decoder around a quantiser.

    * ``encode(images, text=None) -> z_q`` (B, N, d): code vectors for VQ (so ``decode(encode(x))`` is the
      reconstruction), the posterior mean for KL, raw latents for kind="none".
    * ``encode_codes(images, text=None) -> codes`` (B, N) int64 and ``decode_codes(codes, text=None)``
      (VQ only).
    * ``decode(z, text=None)``: inherited from TexTok; any (B, N, d) vectors.
    * ``training_losses(images, text=None) -> (recon, terms)`` for the training loop.

    ``text`` is needed only on a side where text is switched on (off on both sides by default).
    """

    config_class = TiTokConfig
    model_type = "titok"
    config: TiTokConfig

    def __init__(self, config: TiTokConfig) -> None:
        if not isinstance(config, TiTokConfig):
            raise ConfigError(f"TiTok needs a TiTokConfig, got {type(config).__name__} (see TiTokConfig.presets())")
        super().__init__(config)  # TexTokEncoder (-> d channels), TexTokDecoder (d ->), ViT init
        if config.encoder_channels != config.token_channels:  # KL: the encoder's head emits [mean, logvar]
            self.encoder.to_tokens = nn.Linear(config.encoder.width, config.encoder_channels)
            init_vit_weights(self.encoder.to_tokens)
        self.quantizer = build_quantizer(config.quantizer)

    # ---- what generators need to know -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def is_discrete(self) -> bool:
        """True when the bottleneck is a VQ (integer codes exist)."""
        return self.config.is_discrete

    @property
    def codebook_size(self) -> int:
        self._require_codes("codebook_size")
        return self.config.quantizer.num_codes

    def _require_codes(self, what: str) -> VectorQuantizer:
        if not isinstance(self.quantizer, VectorQuantizer):
            raise TextokError(
                f"{what}: this TiTok has a {self.config.quantizer.kind!r} bottleneck, which has no discrete codes; "
                "use encode()/decode() for continuous tokens, or a model with quantizer.kind=vq"
            )
        return self.quantizer

    # ---- bottleneck ---------------------------------------------------------------------------------
    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inference bottleneck (no state change): (B, N, C) encoder output -> (z_q, codes or None).

        VQ returns exactly the code vectors, with a straight-through gradient to the encoder when gradients
        are on; KL returns the posterior mean."""
        q = self.quantizer
        if isinstance(q, VectorQuantizer):
            codes = q.quantize_codes(z)
            zq = q.codebook()[codes].to(z.dtype)
            if torch.is_grad_enabled() and z.requires_grad:  # straight-through; value stays exactly zq
                zn = F.normalize(z, dim=-1) if q.l2_normalized else z
                zq = zq + (zn - zn.detach())
            return zq, codes
        if isinstance(q, DiagonalGaussian):
            return q(z, sample=False).latents, None
        return z, None

    def _encode_latents(self, images: Tensor, text: TextInput) -> Tensor:
        self._check_images(images)
        emb = self.text_embeddings(text, images.shape[0], self.config.text_in_encoder)
        return self.encoder(images, emb)

    # ---- the API ------------------------------------------------------------------------------------
    def encode(self, images: Tensor, text: TextInput = None) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> quantised tokens z_q (B, N, d)."""
        return self._quantize(self._encode_latents(images, text))[0]

    @torch.no_grad()
    def encode_codes(self, images: Tensor, text: TextInput = None) -> Tensor:
        """images -> integer codes (B, N), int64 in [0, codebook_size)."""
        vq = self._require_codes("encode_codes")
        return vq.quantize_codes(self._encode_latents(images, text))

    def decode_codes(self, codes: Tensor, text: TextInput = None) -> Tensor:
        """Integer codes (B, N) -> images (B, 3, H, W); codes outside the codebook are an error."""
        vq = self._require_codes("decode_codes")
        n = self.config.num_tokens
        if codes.dim() != 2 or codes.shape[1] != n:
            raise TextokError(f"codes have shape {tuple(codes.shape)} but this TiTok decodes (batch, {n}) "
                              "integer codes")
        z = vq.decode_codes(codes.to(vq.embedding.weight.device))
        return self.decode(z, text)

    def forward(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, Tensor]:
        """Reconstruct through the (inference) bottleneck: returns (reconstruction, z_q)."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        zq, _ = self._quantize(self.encoder(images, emb if c.text_in_encoder else None))
        return self.decoder(zq, emb if c.text_in_decoder else None), zq

    def training_losses(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction, terms). Terms without the ``metric/`` prefix are already weighted and are added to
        the loss ("quantizer": VQ codebook + beta * commitment, or kl_weight * KL); ``metric/`` ones are
        detached values to log. The VQ runs in training mode here (usage tracking, dead-code restarts)."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        z = self.encoder(images, emb if c.text_in_encoder else None)
        q = self.quantizer
        terms: dict[str, Tensor] = {}
        if isinstance(q, VectorQuantizer):
            out = q(z)
            zq = out.quantized
            terms["quantizer"] = out.losses["loss"]
            terms["metric/commitment"] = out.losses["commitment"].detach()
            terms["metric/codebook_loss"] = out.losses["codebook"].detach()
            terms["metric/codebook_usage"] = out.metrics["usage"].detach()
            terms["metric/perplexity"] = out.metrics["perplexity"].detach()
        elif isinstance(q, DiagonalGaussian):
            out_kl = q(z)
            zq = out_kl.latents
            terms["quantizer"] = c.quantizer.kl_weight * out_kl.losses["kl"]
            terms["metric/kl"] = out_kl.losses["kl"].detach()
        else:
            zq = z
        return self.decoder(zq, emb if c.text_in_decoder else None), terms

    # ---- accounting ---------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        counts = super().num_parameters()
        counts["quantizer"] = sum(p.numel() for p in self.quantizer.parameters())
        return counts

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """TexTok's count plus the VQ's distance matmul (2 N K d); the KL head's extra d columns are ignored."""
        flops = super().flops_per_image(text_tokens)
        if self.is_discrete:
            c = self.config
            flops += 2 * c.num_tokens * c.quantizer.num_codes * c.token_channels
        return flops


def _register() -> None:
    from .registry import register_tokenizer

    register_tokenizer("titok", TiTokConfig, TiTok)


_register()

__all__ = ["TiTok", "TiTokConfig"]
