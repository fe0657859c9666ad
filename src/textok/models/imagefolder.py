"""ImageFolder (Li et al., ICLR 2025): spatially aligned, product-quantized, multi-scale tokens.

Built from TexTok's encoder and decoder (no second ViT)::

    image -> encoder ViT [patches | P K^2 latent tokens (| text)] -> P K^2 latents of C channels
          -> ProductQuantizer: branch p = latents p K^2 .. (p+1) K^2 - 1, a K x K map, multi-scale residual
             quantized (scales 1,1,2,3,3,4,5,6,8,11 in the paper) with its own codebook
          -> f_hat: K^2 positions of P C channels (both branches' codes at a grid cell side by side)
          -> decoder ViT [mask patch tokens | Linear(P C -> width)(f_hat) (| text)] -> image

The latent tokens carry a 2D position embedding of their grid cell (shared by the branches, initialised
with 2D sin-cos) plus a learned per-branch embedding. One branch (the last, "branch 2" in the paper) is
semantically regularized: the spatial mean of its quantized map vs a frozen teacher's global feature
(linearly projected to C), a symmetric InfoNCE over the global batch (every process's rows, gathered with
gradient) on l2-normalised features, weight 0.1; rows
whose quantizer dropout removed scales are left out. Teachers: ``none``, ``opennsfw`` (open_nsfw's 1024-d
pooled feature: the one pretrained image network available offline, a supervised ResNet-50 and far less
semantic than DINOv2) or ``dinov2:<local file>`` (the paper's teacher; no weights ship offline). The teacher is
not a submodule: it is not saved with the tokenizer, trained or averaged by the EMA.

Token counts (the official code's users mix them up): ``num_tokens`` = K^2 grid positions the decoder reads;
``num_latent_tokens`` = P K^2 encoder outputs; ``codes_per_image`` = P sum(pn^2) code ids (572 in the paper);
a folded generator predicts them in sum(pn^2) = 286 positions. See docs/IMAGEFOLDER.md.

Text: off by default (the paper has none); ``text_in_encoder`` / ``text_in_decoder`` add it as TexTok does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import derived
from ..distributed import gather_with_grad
from ..errors import ConfigError, TextokError
from ..nets.opennsfw import OpenNSFW
from .dinov2 import load_dinov2
from .multiscale import MultiScaleCodes, MultiScaleQuantizerConfig, ProductQuantizer
from .textok import TextInput, TexTok, TexTokConfig, TexTokDecoder, TexTokEncoder
from .vit import ViTConfig, init_vit_weights, sincos_2d, transformer_flops, vit_size

OPENNSFW_DIM = 1024


@dataclasses.dataclass
class ImageFolderConfig(TexTokConfig):
    """TexTok's fields plus the latent grid, the product quantizer and the semantic teacher."""

    # Derived: K^2 decoder positions of P * C channels.
    num_tokens: int = derived(121, "latent_grid")
    token_channels: int = derived(64, "quantizer.branches and quantizer.code_dim")
    latent_grid: int = 11  # K; the quantizer's last scale must equal it
    text_in_encoder: bool = False
    text_in_decoder: bool = False
    quantizer: MultiScaleQuantizerConfig = field(default_factory=MultiScaleQuantizerConfig)
    semantic_teacher: str = "none"  # "none" | "opennsfw" | "dinov2:/path/to/checkpoint"
    semantic_dim: int = 768  # a dinov2 teacher's CLS width (ViT-B 768); opennsfw is always 1024
    semantic_branches: str = "last"  # "last" (the paper) or "all" (its ablation)
    semantic_weight: float = 0.1
    semantic_logit_scale: float = 10.0  # InfoNCE logits = scale * cosine similarity
    teacher_size: int = 224  # side the teacher sees

    def __post_init__(self) -> None:
        q = self.quantizer
        if q.scales[-1] != self.latent_grid:
            raise ConfigError(f"quantizer.scales={list(q.scales)} ends at {q.scales[-1]} but latent_grid K="
                              f"{self.latent_grid}: the last scale must be the full K x K grid")
        self.num_tokens = self.latent_grid**2
        self.token_channels = q.branches * q.code_dim
        super().__post_init__()
        t = self.semantic_teacher
        if not (t in ("none", "opennsfw") or (t.startswith("dinov2:") and len(t) > len("dinov2:"))):
            raise ConfigError(f"semantic_teacher={t!r} must be none, opennsfw or dinov2:<local checkpoint file>")
        if self.semantic_branches not in ("last", "all"):
            raise ConfigError(f"semantic_branches={self.semantic_branches!r} must be 'last' or 'all'")
        if self.encoder.width % 4:
            raise ConfigError(f"encoder.width={self.encoder.width} must be divisible by 4 (2D sin-cos positions)")
        if self.semantic_weight < 0 or self.teacher_size < 16:
            raise ConfigError("semantic_weight must be >= 0 and teacher_size >= 16")

    # ---- counts ---------------------------------------------------------------------------------------
    @property
    def branches(self) -> int:
        return self.quantizer.branches

    @property
    def num_latent_tokens(self) -> int:
        """Encoder latent tokens: P K^2 (242 in the paper)."""
        return self.branches * self.latent_grid**2

    @property
    def codes_per_image(self) -> int:
        """Code ids per image: P sum(pn^2) (572 in the paper)."""
        return self.quantizer.codes_per_image

    @property
    def uses_teacher(self) -> bool:
        return self.semantic_teacher != "none" and self.semantic_weight > 0

    @property
    def teacher_dim(self) -> int:
        return OPENNSFW_DIM if self.semantic_teacher == "opennsfw" else self.semantic_dim

    def encoder_view(self) -> TexTokConfig:
        """The TexTok config of the encoder: P K^2 latent tokens of C channels."""
        return TexTokConfig(image_size=self.image_size, patch_size=self.patch_size, num_tokens=self.num_latent_tokens,
                            token_channels=self.quantizer.code_dim, encoder=self.encoder, decoder=self.decoder,
                            text_in_encoder=self.text_in_encoder, text_in_decoder=self.text_in_decoder,
                            text_encoder=self.text_encoder, text_dim=self.text_dim,
                            text_max_length=self.text_max_length, class_token=self.class_token,
                            norm_pre=self.norm_pre, norm_eps=self.norm_eps, gelu=self.gelu,
                            legacy_token_layout=self.legacy_token_layout, text_positions=self.text_positions)


def _register_presets() -> None:
    # The paper: ViT-B encoder and decoder (DINOv2-initialised there; trained from scratch here), patch 16 at
    # 256 px, K = 11, two branches of 4096 x 32 codes, scales 1,1,2,3,3,4,5,6,8,11. The semantic teacher is
    # open_nsfw, the one pretrained image network available offline (the paper's: DINOv2, see dinov2:<file>).
    ImageFolderConfig.register_preset("imagefolder-b-256")(
        lambda: ImageFolderConfig(image_size=256, patch_size=16, encoder=vit_size("base"), decoder=vit_size("base"),
                                  latent_grid=11, quantizer=MultiScaleQuantizerConfig(), semantic_teacher="opennsfw"))
    # CPU sizes (32 and 64 px): ViT width 128, depth 4; 1024 codes of 16 channels per branch (small data sets do
    # not keep 4096 in use); K = 6 (32 px) and 8 (64 px), about the paper's K / patch-grid ratio of 11/16.
    for res, patch, scales in ((32, 4, (1, 2, 3, 4, 6)), (64, 8, (1, 2, 3, 4, 6, 8))):
        ImageFolderConfig.register_preset(f"imagefolder-s-{res}")(
            lambda res=res, patch=patch, scales=scales: ImageFolderConfig(
                image_size=res, patch_size=patch, encoder=ViTConfig(width=128, depth=4, heads=4),
                decoder=ViTConfig(width=128, depth=4, heads=4), latent_grid=scales[-1], teacher_size=64,
                quantizer=MultiScaleQuantizerConfig(scales=scales, num_codes=1024, code_dim=16, dropout_start=2)))
    # The one the tests use.
    ImageFolderConfig.register_preset("imagefolder-tiny")(
        lambda: ImageFolderConfig(
            image_size=16, patch_size=4, encoder=ViTConfig(width=32, depth=2, heads=2),
            decoder=ViTConfig(width=32, depth=2, heads=2), latent_grid=3, teacher_size=32,
            quantizer=MultiScaleQuantizerConfig(scales=(1, 2, 3), num_codes=64, code_dim=8,
                                                dropout_start=1)))


_register_presets()


class ImageFolderEncoder(TexTokEncoder):
    """TexTok's encoder whose P K^2 latent tokens are placed by (grid cell, branch) instead of one learned
    position each: position = 2D embedding of the cell (shared by branches) + the branch's embedding."""

    def __init__(self, cfg: ImageFolderConfig) -> None:
        super().__init__(cfg.encoder_view())
        del self.latent_pos  # replaced by grid_pos + branch_embed
        K, P, D = cfg.latent_grid, cfg.branches, cfg.encoder.width
        self.grid, self.branches = K, P
        self.grid_pos = nn.Parameter(sincos_2d(K, K, D)[None] * (2.0 / D) ** 0.5)  # unit RMS norm, like the others
        self.branch_embed = nn.Parameter(torch.randn(1, P, D) * D**-0.5)

    def latent_inputs(self) -> Tensor:
        K2 = self.grid * self.grid
        pos = self.grid_pos.repeat(1, self.branches, 1) + self.branch_embed.repeat_interleave(K2, dim=1)
        return self.latent_tokens + pos


class OpenNSFWPooled(OpenNSFW):
    """open_nsfw as a teacher: its 1024-d pooled feature, not the NSFW probabilities."""

    def forward(self, x: Tensor) -> Tensor:
        return self.pooled(x)


def build_teacher(spec: str, image_size: int) -> nn.Module:
    """A frozen teacher: images in [-1, 1] -> (B, feature_dim) global features."""
    if spec == "opennsfw":
        return OpenNSFWPooled(size=image_size)
    if spec.startswith("dinov2:"):
        return load_dinov2(spec.split(":", 1)[1], patch_size=16, image_size=image_size)
    raise ConfigError(f"unknown semantic teacher {spec!r}")


def symmetric_info_nce(a: Tensor, b: Tensor, rows: Tensor, logit_scale: float) -> Tensor:
    """CLIP's loss between row-paired features a, b (B, C), over the rows where ``rows`` (B,) is True only.

    Other rows are masked out of both softmaxes and of the mean (no boolean indexing: no host sync)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = logit_scale * a @ b.t()
    outside = ~(rows[:, None] & rows[None, :])
    logits = logits.masked_fill(outside, -1e4)
    target = torch.arange(a.shape[0], device=a.device)
    per_row = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                     + F.cross_entropy(logits.t(), target, reduction="none"))
    return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp_min(1)


class ImageFolder(MultiScaleCodes, TexTok):
    """ImageFolder's tokenizer: TexTok's encoder and decoder around a product quantizer of multi-scale residual
    codes on a K x K grid (P branches). Codes are (B, P, L) int64, L = sum(pn^2), laid out scale by scale
    (row-major per scale).

    * ``encode(images, text=None) -> z_q`` (B, K^2, P C): f_hat of all scales (straight-through gradient);
      ``decode(z_q, text=None) -> images`` (inherited from TexTok).
    * ``encode_codes(images, text=None) -> codes`` (B, P, L); ``codes_per_scale(codes)`` -> one (B, P, pn, pn)
      map per scale.
    * ``fhat_from_codes(codes, num_scales=None) -> z_q`` and ``decode_codes(codes, text=None, num_scales=None)
      -> images`` rebuild from any prefix of the scales (codes of the first n scales, or ``num_scales=n``).
    * ``teacher_forcing_inputs(codes)`` (B, L - pn_0^2, P C): a folded generator's inputs.
    * ``training_losses(images, text=None) -> (recon, terms)`` for the training loop.
    """

    config_class = ImageFolderConfig
    model_type = "imagefolder"
    config: ImageFolderConfig

    def __init__(self, config: ImageFolderConfig) -> None:
        if not isinstance(config, ImageFolderConfig):
            raise ConfigError(f"ImageFolder needs an ImageFolderConfig, got {type(config).__name__} "
                              "(see ImageFolderConfig.presets())")
        nn.Module.__init__(self)  # not TexTok.__init__: the encoder and decoder see different token layouts
        self.config = config
        self.encoder = ImageFolderEncoder(config)
        self.decoder = TexTokDecoder(config)  # K^2 tokens of P C channels; token_proj = the paper's 1x1 conv
        self.quantizer = ProductQuantizer(config.quantizer)
        self.semantic_proj = nn.Linear(config.teacher_dim, config.quantizer.code_dim) if config.uses_teacher else None
        object.__setattr__(self, "_teacher", None)  # loaded on first use; deliberately not a submodule
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT init for encoder, decoder and the semantic projection; the quantizer keeps its own (a normalised
        uniform codebook, PyTorch's default phi convs); latent tokens and positions are set where created."""
        for part in (self.encoder, self.decoder, self.semantic_proj):
            if part is not None:
                init_vit_weights(part)

    # ---- what generators need to know ---------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return self.config.branches

    # ---- the API ------------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor, text: TextInput = None) -> Tensor:
        """images -> unquantized encoder outputs (B, P K^2, C)."""
        self._check_images(images)
        return self.encoder(images, self.text_embeddings(text, images.shape[0], self.config.text_in_encoder))

    def forward(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, Tensor]:
        """Reconstruct from all scales: returns (reconstruction, z_q)."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        zq = self.quantizer(self.encoder(images, emb if c.text_in_encoder else None)).quantized
        return self.decoder(zq, emb if c.text_in_decoder else None), zq

    # ---- training -----------------------------------------------------------------------------------
    def teacher(self, device: torch.device | str | None = None) -> nn.Module | None:
        """The frozen semantic teacher (built on first use), or None."""
        if not self.config.uses_teacher:
            return None
        if self._teacher is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the RNG: resumed runs stay exact
                teacher = build_teacher(self.config.semantic_teacher, self.config.teacher_size)
            object.__setattr__(self, "_teacher", teacher)
            got = getattr(self._teacher, "feature_dim", None)
            if got != self.config.teacher_dim:
                raise TextokError(f"semantic teacher {self.config.semantic_teacher!r} gives {got}-d features but "
                                  f"semantic_dim={self.config.teacher_dim}; set semantic_dim={got}")
        if device is not None:
            object.__setattr__(self, "_teacher", self._teacher.to(device))
        return self._teacher

    def semantic_loss(self, images: Tensor, zq: Tensor, rows: Tensor) -> Tensor:
        """InfoNCE between the projected teacher feature and the mean quantized map of the regularized
        branch(es), over ``rows`` (B,) bool, with every process's rows as negatives in training. Unweighted."""
        teacher = self.teacher(images.device)
        with torch.no_grad():
            target = teacher(images.float()).float()
        target = self.semantic_proj(target)
        C, P = self.config.quantizer.code_dim, self.num_branches
        branches = range(P) if self.config.semantic_branches == "all" else [P - 1]
        # In training under data parallelism the negatives are every process's rows, gathered with gradient
        # (the reference's gather_with_grad): every process computes the loss of the whole global batch.
        gather = gather_with_grad if self.training else (lambda x: x)
        target, rows = gather(target), gather(rows.to(torch.uint8)).bool()
        losses = [symmetric_info_nce(gather(zq[..., p * C:(p + 1) * C].mean(1)), target, rows,
                                     self.config.semantic_logit_scale) for p in branches]
        return sum(losses) / len(losses)

    def training_losses(self, images: Tensor, text: TextInput = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(reconstruction, terms): ``quantizer`` (VQ loss, averaged over scales and branches) and ``semantic``
        (weighted) are added to the loss; ``metric/...`` values are logged, among them the code usage of every
        branch and scale (``metric/usage_b{p}_s{s}``) and the fraction of rows quantizer dropout truncated."""
        self._check_images(images)
        c = self.config
        emb = self.text_embeddings(text, images.shape[0], c.uses_text)
        z = self.encoder(images, emb if c.text_in_encoder else None)
        B, S = images.shape[0], self.quantizer.num_scales
        keep = self.quantizer.sample_dropout(B, images.device) if self.training and c.quantizer.dropout > 0 else None
        out = self.quantizer(z, keep)
        recon = self.decoder(out.quantized, emb if c.text_in_decoder else None)
        terms = {"quantizer": out.losses["loss"],
                 "metric/commitment": out.losses["commitment"].detach(),
                 "metric/codebook_loss": out.losses["codebook"].detach(),
                 "metric/codebook_usage": out.metrics["usage"].detach(),
                 "metric/perplexity": out.metrics["perplexity"].detach()}
        usage = out.metrics["usage_per_scale"].detach()
        for p in range(usage.shape[0]):
            for s in range(usage.shape[1]):
                terms[f"metric/usage_b{p}_s{s}"] = usage[p, s]
        full = torch.ones(B, dtype=torch.bool, device=images.device) if keep is None else keep >= S
        terms["metric/dropped_rows"] = 1.0 - full.float().mean()
        if self.semantic_proj is not None:
            sem = self.semantic_loss(images, out.quantized, full)
            terms["semantic"] = c.semantic_weight * sem
            terms["metric/semantic_loss"] = sem.detach()
        return recon, terms

    # ---- accounting ---------------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        counts = super().num_parameters()
        counts["quantizer"] = sum(p.numel() for p in self.quantizer.parameters())
        if self.semantic_proj is not None:
            counts["semantic_proj"] = sum(p.numel() for p in self.semantic_proj.parameters())
        return counts

    def flops_per_image(self, text_tokens: int = 0) -> float:
        """Forward FLOPs (2 x multiply-adds) of encoder, decoder and the code matching (teacher excluded)."""
        c = self.config
        P = c.num_patches
        enc_len = P + c.num_latent_tokens + c.num_prefix + (text_tokens if c.text_in_encoder else 0)
        dec_len = P + c.num_tokens + c.num_prefix + c.decoder_prefix_tokens + (text_tokens if c.text_in_decoder else 0)
        patch = 2 * P * 3 * c.patch_size**2 * (c.encoder.width + c.decoder.width)
        heads = 2 * c.num_latent_tokens * c.encoder.width * c.quantizer.code_dim
        heads += 2 * c.num_tokens * c.token_channels * c.decoder.width
        text = 2 * text_tokens * c.text_dim * ((c.encoder.width if c.text_in_encoder else 0)
                                              + (c.decoder.width if c.text_in_decoder else 0))
        match = 2 * c.codes_per_image * c.quantizer.num_codes * c.quantizer.code_dim
        return (transformer_flops(c.encoder, enc_len) + transformer_flops(c.decoder, dec_len) + patch + heads
                + text + match)


__all__ = ["ImageFolder", "ImageFolderConfig", "ImageFolderEncoder", "build_teacher", "symmetric_info_nce"]
