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

``stage`` picks the recipe. ``"pixel"`` (every preset's default) is a single stage: the decoder outputs pixels
and the loop's l2/perceptual/GAN losses train everything. TiTok's published numbers come from two stages
around a frozen MaskGIT-VQGAN (:mod:`~textok.models.maskgit_vqgan`, loaded from ``vqgan_weights``):

* ``"proxy-codes"`` (stage 1): the decoder's head predicts, at each of the VQGAN's 16 x 16 code positions,
  logits over its 1024 codes; the loss is the cross-entropy against the VQGAN's codes of the image (plus the
  quantizer's terms). Reconstructions are the VQGAN's decoding of the arg-max codes.
* ``"decoder-finetune"`` (stage 2): encoder and quantizer frozen; the decoder's logits are turned into
  softmax-weighted VQGAN code vectors and decoded by the frozen VQGAN decoder, so the loop's pixel losses
  fine-tune the ViT decoder. It starts from a stage-1 run (``init_from``). (1d-tokenizer also leaves the
  VQGAN decoder trainable in this stage; here it stays frozen.)

In both, the VQGAN is part of the model (``vqgan.*`` in ``model.safetensors``), so a saved two-stage
tokenizer decodes without the original weight file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import OMIT_DEFAULT, derived
from ..errors import CheckpointMismatchError, ConfigError, TextokError
from .maskgit_vqgan import PUBLISHED_FILE, MaskGITVQGAN, MaskGITVQGANConfig
from .quantizers import DiagonalGaussian, QuantizerConfig, VectorQuantizer, build_quantizer
from .textok import TextInput, TexTok, TexTokConfig, TexTokDecoder
from .vit import ViTConfig, init_vit_weights, vit_size

STAGES = ("pixel", "proxy-codes", "decoder-finetune")


@dataclasses.dataclass
class TiTokConfig(TexTokConfig):
    """TexTok's config plus the bottleneck; text off and 12 channels per token by default."""

    # Follows quantizer.code_dim (set in __post_init__); an override of it sets quantizer.code_dim.
    token_channels: int = derived(12, "quantizer.code_dim", settable=True)
    text_in_encoder: bool = False
    text_in_decoder: bool = False
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig.preset("titok-vq"))
    # The two-stage fields are left out of saved configs while they hold their defaults (single-stage configs read
    # as they did before these fields existed).
    stage: str = field(default="pixel", metadata=OMIT_DEFAULT)  # "pixel" | "proxy-codes" (stage 1) | "decoder-finetune" (stage 2); see the module doc
    vqgan_weights: str = field(default="", metadata=OMIT_DEFAULT)  # local MaskGIT-VQGAN weights (published key layout), read by the two stages
    vqgan: MaskGITVQGANConfig = field(default_factory=MaskGITVQGANConfig, metadata=OMIT_DEFAULT)  # its shape (default: the published one)

    def __post_init__(self) -> None:
        self.token_channels = self.quantizer.code_dim
        super().__post_init__()
        if self.stage not in STAGES:
            raise ConfigError(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        if not self.uses_vqgan:
            return
        if not self.vqgan.with_encoder:
            if self.stage == "proxy-codes":
                raise ConfigError("stage=proxy-codes learns the VQGAN's codes of images, so it needs the VQGAN's "
                                  "encoder (vqgan.with_encoder=true and vqgan_weights)")
            if self.vqgan_weights:
                raise ConfigError("vqgan.with_encoder=false: the VQGAN's decoder comes from the saved model, so "
                                  "leave vqgan_weights empty")
        elif not self.vqgan_weights:
            raise ConfigError(f"stage={self.stage} needs the MaskGIT-VQGAN weights: set vqgan_weights=/path/to/"
                              f"{PUBLISHED_FILE} (model.vqgan_weights=... on the command line; a local file, "
                              "not bundled)")
        self.vqgan.check()
        if self.patch_size != self.vqgan.downsample:
            raise ConfigError(f"stage={self.stage}: the decoder predicts one VQGAN code per patch, so patch_size "
                              f"({self.patch_size}) must equal the VQGAN's downsampling ({self.vqgan.downsample})")

    @property
    def uses_vqgan(self) -> bool:
        """True for the two stages of TiTok's recipe (the decoder works in the MaskGIT-VQGAN's codes)."""
        return self.stage != "pixel"

    @property
    def is_discrete(self) -> bool:
        return self.quantizer.kind == "vq"

    @property
    def encoder_channels(self) -> int:
        """Width of the encoder's output head: 2d (mean, log-variance) for the KL variant, else d."""
        return 2 * self.token_channels if self.quantizer.kind == "kl" else self.token_channels


def _register_presets() -> None:
    # Every preset runs stage="pixel" (one stage, pixels out). TiTok's two-stage recipe is these presets with
    # stage=proxy-codes, then stage=decoder-finetune, and vqgan_weights (configs/titok-stage{1,2}.yaml).
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


class ProxyCodeDecoder(TexTokDecoder):
    """TexTok's decoder with TiTok's proxy-code head in place of the pixel head: at each output patch, logits
    over the VQGAN's codebook. The head is 1d-tokenizer's (1x1 convs width -> 2 width -> tanh -> codes)."""

    def __init__(self, cfg: TiTokConfig, num_codes: int) -> None:
        super().__init__(cfg)
        D = cfg.decoder.width
        self.to_pixels = None
        self.to_codes = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, num_codes))

    def forward(self, z: Tensor, text) -> Tensor:
        """-> logits (B, num_codes, grid, grid), positions in raster order as the VQGAN's code grid."""
        g = self.cfg.grid
        return self.to_codes(self.features(z, text)).transpose(1, 2).reshape(z.shape[0], -1, g, g)


class TiTok(TexTok):
    """TexTok's encoder and decoder around a quantiser.

    * ``encode(images, text=None) -> z_q`` (B, N, d): code vectors for VQ (so ``decode(encode(x))`` is the
      reconstruction), the posterior mean for KL, raw latents for kind="none".
    * ``encode_codes(images, text=None) -> codes`` (B, N) int64 and ``decode_codes(codes, text=None)``
      (VQ only).
    * ``decode(z, text=None)``: any (B, N, d) vectors -> images (in the two stages, through the VQGAN).
    * ``training_losses(images, text=None) -> (recon, terms)`` for the training loop.
    * ``decode_logits(z, text=None) -> (B, K, g, g)``: the decoder's scores over the VQGAN's codes (the two
      stages of TiTok's recipe, ``config.stage != "pixel"``; ``self.vqgan`` is the frozen MaskGIT-VQGAN).

    ``text`` is needed only on a side where text is switched on (off on both sides by default).
    ``load_vqgan=False`` builds the VQGAN without reading ``vqgan_weights`` (its weights come from a saved
    model: ``from_pretrained`` does this).
    """

    config_class = TiTokConfig
    model_type = "titok"
    config: TiTokConfig

    def __init__(self, config: TiTokConfig, load_vqgan: bool = True) -> None:
        if not isinstance(config, TiTokConfig):
            raise ConfigError(f"TiTok needs a TiTokConfig, got {type(config).__name__} (see TiTokConfig.presets())")
        super().__init__(config)  # TexTokEncoder (-> d channels), TexTokDecoder (d ->), ViT init
        if config.encoder_channels != config.token_channels:  # KL: the encoder's head emits [mean, logvar]
            self.encoder.to_tokens = nn.Linear(config.encoder.width, config.encoder_channels)
            init_vit_weights(self.encoder.to_tokens)
        self.quantizer = build_quantizer(config.quantizer)
        self.vqgan: MaskGITVQGAN | None = None
        self._vqgan_file: str | None = None  # set when the VQGAN was read from vqgan_weights
        if config.uses_vqgan:
            self.decoder = ProxyCodeDecoder(config, config.vqgan.num_codes)
            init_vit_weights(self.decoder)
            self.vqgan = MaskGITVQGAN(config.vqgan)
            if load_vqgan and config.vqgan_weights:
                self.vqgan.load_file(config.vqgan_weights)
                self._vqgan_file = config.vqgan_weights
            self.vqgan.requires_grad_(False).eval()  # never trained: its parameters stay out of the optimizer
            if config.stage == "decoder-finetune":  # stage 2 trains the decoder only
                self.encoder.requires_grad_(False)
                self.quantizer.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, directory, config: TiTokConfig | None = None,
                        map_location: str | torch.device = "cpu") -> "TiTok":
        """As :meth:`PretrainedMixin.from_pretrained`; a two-stage TiTok's VQGAN comes from its
        ``model.safetensors``, so ``vqgan_weights`` need not exist on this machine."""
        saved = cls.read_config(directory)
        model = cls(config or saved, load_vqgan=False)
        model.load_weights(directory, saved_config=saved, map_location=map_location)
        return model

    def load_weights(self, directory, saved_config=None, map_location: str | torch.device = "cpu") -> None:
        """As :meth:`PretrainedMixin.load_weights`; when this model read its VQGAN from ``vqgan_weights``
        (a stage-2 run started with ``init_from``), the saved model must hold the same VQGAN."""
        before = ([t.clone() for t in self.vqgan.state_dict().values()]
                  if self.vqgan is not None and self._vqgan_file else None)
        super().load_weights(directory, saved_config=saved_config, map_location=map_location)
        if before is not None and not all(torch.equal(a, b) for a, b in zip(before, self.vqgan.state_dict().values())):
            raise CheckpointMismatchError(f"{directory} was trained with another MaskGIT-VQGAN than vqgan_weights="
                                          f"{self._vqgan_file}; point vqgan_weights at the file its stage 1 used")

    # ---- what generators need to know -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def is_discrete(self) -> bool:
        """True when the bottleneck is a VQ (integer codes exist)."""
        return self.config.is_discrete

    @property
    def code_form(self) -> str:
        """Flat codes (B, N) with a VQ bottleneck; continuous tokens with a KL one."""
        return "codes" if self.is_discrete else "tokens"

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

    def decode(self, z: Tensor, text: TextInput = None) -> Tensor:
        """Tokens (B, N, d) -> images; in the two stages through the VQGAN (stage 1: its decoding of the
        arg-max codes, as TiTok evaluates stage 1; stage 2: the softmax-weighted codes it is trained on)."""
        if self.vqgan is None:
            return super().decode(z, text)
        return self._logits_to_pixels(self.decode_logits(z, text))

    def decode_logits(self, z: Tensor, text: TextInput = None) -> Tensor:
        """Tokens (B, N, d) -> (B, K, g, g) scores over the VQGAN's K codes at its g x g code positions."""
        if self.vqgan is None:
            raise TextokError("decode_logits: this TiTok has stage='pixel' (its decoder outputs pixels); the "
                              "stages proxy-codes / decoder-finetune predict VQGAN codes")
        c = self.config
        if z.dim() != 3 or z.shape[1:] != (c.num_tokens, c.token_channels):
            raise TextokError(f"tokens have shape {tuple(z.shape)} but this model decodes (batch, {c.num_tokens}, "
                              f"{c.token_channels})")
        return self.decoder(z, self.text_embeddings(text, z.shape[0], c.text_in_decoder))

    def _logits_to_pixels(self, logits: Tensor) -> Tensor:
        if self.config.stage == "proxy-codes":
            return self.vqgan.decode_codes(logits.argmax(1))
        return self.vqgan.decode_logits(logits)

    def forward(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, Tensor]:
        """Reconstruct through the (inference) bottleneck: returns (reconstruction, z_q)."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        zq, _ = self._quantize(self.encoder(images, emb if c.text_in_encoder else None))
        out = self.decoder(zq, emb if c.text_in_decoder else None)
        return (out if self.vqgan is None else self._logits_to_pixels(out)), zq

    def training_losses(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction, terms). Terms without the ``metric/`` prefix are already weighted and are added to
        the loss ("quantizer": VQ codebook + beta * commitment, or kl_weight * KL; "proxy_codes" in stage 1);
        ``metric/`` ones are detached values to log. The VQ runs in training mode (usage tracking, dead-code
        restarts) except in stage 2, where encoder and quantizer are frozen and run without gradients."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        enc_text, dec_text = (emb if c.text_in_encoder else None), (emb if c.text_in_decoder else None)
        if c.stage == "decoder-finetune":
            with torch.no_grad():
                zq, _ = self._quantize(self.encoder(images, enc_text))
            return self.vqgan.decode_logits(self.decoder(zq, dec_text)), {}
        zq, terms = self._train_bottleneck(self.encoder(images, enc_text))
        if c.stage == "pixel":
            return self.decoder(zq, dec_text), terms
        # stage 1: cross-entropy against the frozen VQGAN's codes of the image (1d-tokenizer's stage-1 loss)
        with torch.no_grad():
            target = self.vqgan.encode_to_codes(images)
        logits = self.decoder(zq, dec_text)
        terms["proxy_codes"] = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)
        with torch.no_grad():
            pred = logits.argmax(1)
            recon = self.vqgan.decode_codes(pred)
            terms["metric/code_accuracy"] = (pred == target).float().mean()
            terms["metric/pixel_mse"] = F.mse_loss(recon.float(), images.float())
        return recon, terms

    def _train_bottleneck(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The bottleneck in training mode: (z_q, weighted loss terms and metrics)."""
        q = self.quantizer
        c = self.config
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
        return zq, terms

    def last_layer(self) -> nn.Parameter:
        """The last trained layer before the pixels: the code head's output layer in the two stages."""
        return self.decoder.to_codes[-1].weight if self.vqgan is not None else super().last_layer()

    # ---- accounting ---------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        counts = super().num_parameters()
        counts["quantizer"] = sum(p.numel() for p in self.quantizer.parameters())
        if self.vqgan is not None:
            counts["vqgan"] = sum(p.numel() for p in self.vqgan.parameters())
        return counts

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """TexTok's count plus the VQ's distance matmul (2 N K d); the KL head's extra d columns are ignored.
        In the two stages the pixel head is replaced by the code head and the VQGAN decoder's convolutions."""
        flops = super().flops_per_image(text_tokens)
        c = self.config
        if self.is_discrete:
            flops += 2 * c.num_tokens * c.quantizer.num_codes * c.token_channels
        if self.vqgan is not None:
            P, D, K = c.num_patches, c.decoder.width, c.vqgan.num_codes
            flops += 2 * P * (2 * D * D + 2 * D * K) - 2 * P * D * 3 * c.patch_size**2
            flops += self.vqgan.conv_flops("decoder", c.image_size)
        return flops


__all__ = ["TiTok", "TiTokConfig"]
