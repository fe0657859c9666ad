"""MaskGIT: a bidirectional transformer that generates the N discrete tokens of an image (TiTok's generator).

Chang et al. 2022 (MaskGIT) as used by Yu et al. 2024 (TiTok, "An Image is Worth 32 Tokens"). The sequence is
``[class] + N image tokens``; each image token is a code in ``[0, K)`` or the extra id ``K`` = [MASK]. The class
embedding has one extra row, the null class, used for label dropout and classifier-free guidance. Every image
position gets logits over the K codes from an output head that is **not** tied to the input embedding (as in
TiTok's released generator, whose ``lm_head`` is a separate linear layer).

Mask schedule ``gamma(t)``: a decreasing map [0,1] -> [0,1] with gamma(0)=1, gamma(1)=0.

* ``"arccos"`` (default): gamma(t) = arccos(t) / (pi/2), what TiTok's released code uses in training and
  sampling. Training masks ``round(N * gamma(u))`` (at least 1) tokens, u ~ U(0,1); sampling keeps
  ``floor(N * gamma((s+1)/steps))`` tokens masked after step s.
* ``"cosine"``: gamma(t) = cos(pi/2 * t), the MaskGIT paper's choice; it masks fewer tokens in training and
  unmasks more early in sampling than arccos.

Training and sampling follow TiTok's released generator: cross-entropy with label smoothing 0.1 on every
position, masked positions weighted 1 and unmasked ones 0.1; sampling with Gumbel-noised logits for both
the choice of each token and the confidence that decides which tokens stay masked, a Gumbel temperature
annealed linearly to 0, the logits divided by 0.5 + 0.8 (1 - t) (TiTok's softmax-temperature annealing, on in
its FID sampler) and guidance ramped over the steps (:meth:`MaskGIT.generate`).

Sampler defaults are stored with the model (``MaskGITConfig.sampler``, saved in its config.json), so
``textok sample`` draws a B-64 generator with B-64's settings. The presets carry TiTok's per-model settings
from 1d-tokenizer's inference configs: ``maskgit-b`` (TiTok-L-32: 8 steps, temperature 9.5, guidance 4.5
linear), ``maskgit-b-64`` (TiTok-B-64: 8 steps, temperature 11.0, guidance 3.0 linear), ``maskgit-b-128``
(TiTok-S-128: 64 steps, temperature 2.8, guidance 6.9 power-cosine with exponent 3). TiTok's linear and
constant guidance is cond + w (cond - uncond), stored here as uncond + (w + 1)(cond - uncond); its
power-cosine guidance is uncond + w (cond - uncond), stored as is.

Backbone. The transformer is textok's pre-LN ViT stack (``vit.Transformer``: LayerNorm before attention and MLP,
tanh-GELU, no dropout). TiTok's generators are not: L-32 and B-64 use a post-LN BERT (LayerNorm after each
residual add and on the embeddings, erf-GELU, dropout 0.1 on hidden states and attention), S-128 a U-ViT of
width 1024 and depth 20. The presets reproduce their sizes for L-32 and B-64 (width 768, depth 24, 16 heads)
and their samplers, not their weights' layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..devices import autocast_for
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from .kinds import SampleRequest
from .maskgit_schedule import (GUIDANCE_SCHEDULES, MASK_SCHEDULES, TEMPERATURE_SCHEDULES, MaskGITSamplerConfig,
                               check_sampler, guidance_at, mask_ratio, masked_counts)
from .vit import GELU_KINDS, LearnedPosEmbed, Transformer, ViTConfig, init_vit_weights, transformer_flops

@dataclasses.dataclass
class MaskGITConfig(Config):
    """Size and training options of a class-conditional MaskGIT over ``num_tokens`` codes of ``codebook_size``."""

    num_tokens: int = 32
    codebook_size: int = 4096
    num_classes: int = 1000
    transformer: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig(width=768, depth=24, heads=16))
    class_dropout: float = 0.1  # probability of replacing the label by the null class (enables CFG)
    label_smoothing: float = 0.1  # TiTok's generator
    unmasked_loss_weight: float = 0.1  # weight of the unmasked positions' cross-entropy (masked ones: 1)
    mask_schedule: str = "arccos"  # "arccos" (TiTok's released code) or "cosine" (MaskGIT paper)
    sampler: MaskGITSamplerConfig = dataclasses.field(default_factory=MaskGITSamplerConfig)
    # Transformer layout options that published generators (1d-tokenizer's, read by textok.convert) were trained
    # with; the defaults are textok's pre-norm ViT. Left out of to_dict() while they hold their defaults.
    norm_pre: bool = False  # a LayerNorm over the embedded sequence (BERT's embedding LayerNorm)
    post_norm: bool = False  # BERT's post-norm blocks (and no final LayerNorm)
    long_skips: bool = False  # U-ViT long skip connections (an odd transformer depth)
    norm_eps: float = 1e-6
    gelu: str = "tanh"  # "tanh" or "none" (exact)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`, without the layout options that hold their defaults."""
        data = super().to_dict()
        for name, default in MASKGIT_LAYOUT_DEFAULTS.items():
            if data.get(name) == default:
                data.pop(name)
        return data

    def __post_init__(self) -> None:
        if self.gelu not in GELU_KINDS or not self.norm_eps > 0:
            raise ConfigError(f"gelu must be one of {', '.join(GELU_KINDS)} and norm_eps > 0 (got {self.gelu!r}, "
                              f"{self.norm_eps})")
        if self.long_skips and self.transformer.depth % 2 == 0:
            raise ConfigError(f"long_skips (a U-ViT) needs an odd transformer.depth, got {self.transformer.depth}")
        if self.num_tokens < 1:
            raise ConfigError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.unmasked_loss_weight <= 1.0:
            raise ConfigError(f"unmasked_loss_weight must lie in [0, 1], got {self.unmasked_loss_weight}")
        if self.mask_schedule not in MASK_SCHEDULES:
            known = ", ".join(MASK_SCHEDULES)
            raise ConfigError(f"mask_schedule {self.mask_schedule!r} is unknown; use one of {known}")

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True, prefix: str = "") -> "MaskGITConfig":
        """A config saved before the sampler was stored with the model sampled without softmax annealing: it
        keeps that sampler."""
        if isinstance(data, dict) and "sampler" not in data:
            data = {**data, "sampler": {"softmax_annealing": False}}
        return super().from_dict(data, strict=strict, prefix=prefix)


MASKGIT_LAYOUT_DEFAULTS: dict[str, Any] = {"norm_pre": False, "post_norm": False, "long_skips": False,
                                           "norm_eps": 1e-6, "gelu": "tanh"}


@MaskGITConfig.register_preset("maskgit-tiny")
def _maskgit_tiny() -> MaskGITConfig:
    """A CPU-sized generator for tests and demos."""
    return MaskGITConfig(
        num_tokens=32, codebook_size=256, num_classes=10, transformer=ViTConfig(width=64, depth=2, heads=4)
    )


def _maskgit_b(num_tokens: int, sampler: MaskGITSamplerConfig) -> MaskGITConfig:
    # TiTok's L-32 / B-64 generator size: width 768, 24 layers, 16 heads, MLP 3072, 4096 codes, ImageNet classes
    # (a pre-LN ViT here, a post-LN BERT there; see the module docstring).
    return MaskGITConfig(num_tokens=num_tokens, codebook_size=4096, num_classes=1000, sampler=sampler)


@MaskGITConfig.register_preset("maskgit-b")
def _maskgit_b32() -> MaskGITConfig:
    """TiTok-L-32's generator and sampler (titok_l32.yaml: 8 steps, temperature 9.5, guidance 4.5 linear)."""
    return _maskgit_b(32, MaskGITSamplerConfig())


@MaskGITConfig.register_preset("maskgit-b-64")
def _maskgit_b64() -> MaskGITConfig:
    """TiTok-B-64's generator and sampler (titok_b64.yaml: 8 steps, temperature 11.0, guidance 3.0 linear)."""
    return _maskgit_b(64, MaskGITSamplerConfig(temperature=11.0, guidance_scale=4.0))


@MaskGITConfig.register_preset("maskgit-b-128")
def _maskgit_b128() -> MaskGITConfig:
    """TiTok-S-128's sampler (titok_s128.yaml: 64 steps, temperature 2.8, guidance 6.9 power-cosine, exponent 3)
    on the B-size backbone (TiTok's S-128 generator is a U-ViT of width 1024, depth 20)."""
    return _maskgit_b(128, MaskGITSamplerConfig(steps=64, temperature=2.8, guidance_scale=6.9,
                                                guidance_schedule="power-cosine", guidance_exponent=3.0))


def _gumbel(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


class MaskGIT(PretrainedMixin, nn.Module):
    """Class-conditional masked-token generator over ``num_tokens`` discrete codes."""

    config_class = MaskGITConfig
    model_type = "maskgit"

    def __init__(self, cfg: MaskGITConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.transformer.width
        self.tok_embed = nn.Embedding(cfg.codebook_size + 1, d)  # id codebook_size = [MASK]
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)  # id num_classes = null class (CFG)
        self.pos_embed = LearnedPosEmbed(cfg.num_tokens + 1, d)  # class token + image tokens
        self.transformer = Transformer(cfg.transformer, cfg.norm_eps, cfg.gelu, cfg.norm_pre, cfg.post_norm,
                                       cfg.long_skips)
        self.head = nn.Linear(d, cfg.codebook_size)  # untied from tok_embed
        init_vit_weights(self)
        nn.init.trunc_normal_(self.tok_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.class_embed.weight, std=0.02)

    # ---- ids ---------------------------------------------------------------------------------
    @property
    def mask_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---- checks ------------------------------------------------------------------------------
    def check_compatible(self, num_tokens: int, codebook_size: int) -> None:
        """Refuse a tokenizer whose token count or codebook differs from what this generator models."""
        n, k = self.config.num_tokens, self.config.codebook_size
        if (num_tokens, codebook_size) != (n, k):
            raise TextokError(
                f"tokenizer makes {num_tokens} tokens over {codebook_size} codes but this MaskGIT models "
                f"{n} tokens over {k} codes; use a generator with num_tokens={num_tokens} codebook_size={codebook_size}"
            )

    def _check_codes(self, codes: Tensor) -> None:
        n, k = self.config.num_tokens, self.config.codebook_size
        if codes.dim() != 2 or codes.shape[1] != n:
            raise TextokError(f"codes must have shape (batch, {n}), got {tuple(codes.shape)}; "
                              f"the tokenizer and this MaskGIT ({n} tokens) do not match")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TextokError(f"codes must be integer token ids, got dtype {codes.dtype}; "
                              "pass tokenizer indices, not latents")
        if bool(((codes < 0) | (codes >= k)).any()):
            raise TextokError(f"codes hold ids outside [0, {k}) (min {int(codes.min())}, max {int(codes.max())}); "
                              f"they must be indices into a {k}-code codebook")

    def _check_labels(self, labels: Tensor, batch: int | None = None) -> Tensor:
        c = self.config.num_classes
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            want = f"({batch},)" if batch is not None else "(batch,)"
            raise TextokError(f"labels must have shape {want}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TextokError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and bool(((labels < 0) | (labels >= c)).any()):
            raise TextokError(f"class ids must lie in [0, {c}) for this MaskGIT, got min {int(labels.min())} "
                              f"max {int(labels.max())}")
        return labels.long()

    # ---- network -----------------------------------------------------------------------------
    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, N) in [0, K] (K = [MASK]), labels (B,) in [0, C] (C = null)  ->  logits (B, N, K)."""
        x = torch.cat([self.class_embed(labels)[:, None], self.tok_embed(ids)], dim=1)
        x = self.transformer(self.pos_embed(x))
        return self.head(x[:, 1:])

    def guided_logits(self, ids: Tensor, labels: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond), float32.

        Cond and uncond run as one batched forward; ``scale == 1`` is exactly the conditional forward (and skips
        the unconditional half).
        """
        if scale == 1.0:
            return self(ids, labels).float()
        null = torch.full_like(labels, self.null_class)
        cond, uncond = self(torch.cat([ids, ids]), torch.cat([labels, null])).float().chunk(2)
        return uncond + scale * (cond - uncond)

    # ---- training ----------------------------------------------------------------------------
    def mask_tokens(self, codes: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mask round(gamma(u) * N) >= 1 random positions per sample, u ~ U(0,1) (TiTok's count).

        Returns (inputs with [MASK] ids, mask (B, N) bool, ratio (B,)).
        """
        B, N = codes.shape
        u = torch.rand(B, device=codes.device, generator=generator)
        ratio = mask_ratio(u, self.config.mask_schedule)
        count = (ratio * N).round().clamp(1, N).long()
        scores = torch.rand(B, N, device=codes.device, generator=generator)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation per row
        mask = ranks < count[:, None]
        return codes.masked_fill(mask, self.mask_id), mask, ratio

    def training_loss(
        self, codes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Cross-entropy (with ``label_smoothing``) on every position, masked ones weighted 1 and unmasked ones
        ``unmasked_loss_weight`` (TiTok's loss; 0 gives the masked-only loss), with label dropout in training.

        Returns ``loss`` (the weighted mean over the batch's positions), ``accuracy`` on the masked tokens,
        ``mask_ratio`` (mean of the sampled ratios) and the ``mask`` itself.
        """
        self._check_codes(codes)
        labels = self._check_labels(labels, codes.shape[0]).to(codes.device)
        codes = codes.long()
        inputs, mask, ratio = self.mask_tokens(codes, generator)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.config.class_dropout
            labels = labels.masked_fill(drop, self.null_class)
        logits = self(inputs, labels).float()
        # Weighted CE over all positions (no boolean indexing: no host sync on GPU).
        ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none", label_smoothing=self.config.label_smoothing)
        masked = mask.float()
        weight = masked + (1.0 - masked) * self.config.unmasked_loss_weight
        loss = (ce * weight).sum() / weight.sum().clamp_min(1e-8)
        with torch.no_grad():
            accuracy = ((logits.argmax(-1) == codes).float() * masked).sum() / masked.sum().clamp_min(1.0)
        return {"loss": loss, "accuracy": accuracy, "mask_ratio": ratio.float().mean(), "mask": mask}

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        steps: int | None = None,
        *,
        temperature: float | None = None,
        temperature_schedule: Literal["constant", "linear", "cosine"] | None = None,
        choice_temperature: float | None = None,
        softmax_annealing: bool | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: Literal["constant", "linear", "cosine", "power-cosine"] | None = None,
        guidance_exponent: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Iterative parallel decoding from a fully masked sequence -> codes (B, N) int64 in [0, K).

        Every option left ``None`` takes this model's stored sampler (``config.sampler``: TiTok's per-model
        settings for the presets, see the module docstring).

        Step s (progress t = (s+1)/steps) predicts every masked token: the guided logits, divided by
        0.5 + 0.8 (1 - t) with ``softmax_annealing``, plus Gumbel noise scaled by the step's temperature give
        the pick (sampling at that temperature; 0 = argmax); the pick is scored by its logit plus Gumbel noise
        scaled by ``choice_temperature * (1 - t)``, and the least confident are re-masked so that
        :func:`masked_counts` tokens remain masked. Already-decoded tokens are never re-masked. (A logit is not
        a log-probability: log-softmax subtracts a logsumexp that differs from position to position, so the
        two rank positions differently; TiTok's code ranks logits.)

        * ``temperature_schedule``: ``linear`` = temperature * (1 - t) (TiTok's annealing; the last step is
          greedy), ``constant`` (MaskGIT) or ``cosine`` = temperature * cos(pi/2 * t).
        * ``choice_temperature``: the confidence noise; ``None`` = the same as ``temperature`` (TiTok).
        * ``guidance_schedule`` (w = ``guidance_scale``, progress g = s/steps as in TiTok's code, so the
          first step is unguided for the increasing schedules): ``linear`` 1 + (w-1) g, ``constant`` w,
          ``power-cosine`` 1 + (w-1)(1 - cos(pi g^p))/2 with p = ``guidance_exponent`` (MDT's schedule, TiTok
          S-128 uses p = 3; ``cosine`` is the same schedule). Scale 1 is the plain conditional model.
        """
        sc = self.config.sampler
        steps = sc.steps if steps is None else steps
        temperature = sc.temperature if temperature is None else temperature
        temperature_schedule = temperature_schedule or sc.temperature_schedule
        softmax_annealing = sc.softmax_annealing if softmax_annealing is None else softmax_annealing
        guidance_scale = sc.guidance_scale if guidance_scale is None else guidance_scale
        if guidance_schedule is None:
            guidance_schedule = sc.guidance_schedule
            exponent = sc.guidance_exponent if guidance_exponent is None else guidance_exponent
        else:  # a schedule chosen here does not inherit the stored one's exponent
            exponent = 1.0 if guidance_exponent is None else guidance_exponent
        if choice_temperature is None:
            choice_temperature = temperature
        check_sampler(steps, temperature, temperature_schedule, guidance_scale, guidance_schedule, exponent,
                      choice_temperature)
        device = self.head.weight.device
        labels = self._check_labels(labels).to(device)
        counts = masked_counts(self.config.num_tokens, steps, self.config.mask_schedule)
        B, N = labels.shape[0], self.config.num_tokens
        ids = torch.full((B, N), self.mask_id, dtype=torch.long, device=device)
        for s in range(steps):
            t = (s + 1) / steps
            if temperature_schedule == "constant":
                temp = temperature
            elif temperature_schedule == "linear":
                temp = temperature * (1.0 - t)
            else:
                temp = temperature * math.cos(math.pi / 2 * t)
            scale = guidance_at(guidance_schedule, guidance_scale, s / steps, exponent)
            logits = self.guided_logits(ids, labels, scale)
            if softmax_annealing:
                logits = logits / (0.5 + 0.8 * (1.0 - t))
            is_mask = ids == self.mask_id
            if temp > 0:
                sampled = (logits / temp + _gumbel(logits.shape, device, generator)).argmax(-1)
            else:
                sampled = logits.argmax(-1)
            sampled = torch.where(is_mask, sampled, ids)
            keep_masked = counts[s]
            if keep_masked == 0:
                ids = sampled
                continue
            conf = logits.gather(-1, sampled[..., None]).squeeze(-1)  # logits, as TiTok ranks them
            noise_scale = choice_temperature * (1.0 - t)
            if noise_scale > 0:
                conf = conf + noise_scale * _gumbel(conf.shape, device, generator)
            conf = conf.masked_fill(~is_mask, float("inf"))
            lowest = conf.topk(keep_masked, dim=1, largest=False).indices
            remask = torch.zeros_like(is_mask).scatter_(1, lowest, True)
            ids = sampled.masked_fill(remask, self.mask_id)
        return ids

    # ---- cost --------------------------------------------------------------------------------
    def flops_per_forward(self) -> float:
        """Forward FLOPs (2 x multiply-adds) per sample: transformer over N+1 tokens + the K-way head.

        A guided sampling step costs twice this (cond + uncond).
        """
        c = self.config
        head = 2.0 * c.num_tokens * c.transformer.width * c.codebook_size
        return transformer_flops(c.transformer, c.num_tokens + 1) + head


# ---- its kind's sampling (see models.kinds) ----------------------------------------------------------------
def sample_images(model: MaskGIT, tok: nn.Module, req: SampleRequest) -> Tensor:
    """Codes by iterative parallel decoding (``req.steps`` and unset options: the stored sampler's), decoded by
    the tokenizer."""
    labels = req.labels if req.labels is not None else torch.zeros(req.batch, dtype=torch.long, device=req.device)
    with autocast_for(req.device, req.precision):
        codes = model.generate(labels, req.steps, guidance_scale=req.cfg_scale,
                               generator=req.generator, **req.options)
    return tok.decode_codes(codes, req.decoder_text)


def check_tokenizer(model: MaskGIT, tok: nn.Module, record: dict, fix: str) -> None:
    """The MaskGIT's token count and codebook are the tokenizer's."""
    c, tc = model.config, tok.config
    if (tc.num_tokens, tok.codebook_size) != (c.num_tokens, c.codebook_size):
        raise TextokError(f"the generator makes {c.num_tokens} tokens over {c.codebook_size} codes but the tokenizer "
                          f"decodes {tc.num_tokens} tokens over {tok.codebook_size} codes; {fix}")


__all__ = [
    "MaskGITConfig",
    "MaskGITSamplerConfig",
    "guidance_at",
    "MaskGIT",
    "mask_ratio",
    "masked_counts",
    "MASK_SCHEDULES",
    "TEMPERATURE_SCHEDULES",
    "GUIDANCE_SCHEDULES",
]
