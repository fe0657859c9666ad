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
position, masked positions weighted 1 and unmasked ones 0.1; sampling with Gumbel-noised raw logits for both
the choice of each token and the confidence that decides which tokens stay masked, a temperature annealed
linearly from 9.5 to 0 and guidance ramped linearly over the steps (:meth:`MaskGIT.generate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError, TextokError
from ..hub import PretrainedMixin
from .vit import LearnedPosEmbed, Transformer, ViTConfig, init_vit_weights, transformer_flops

MASK_SCHEDULES = ("cosine", "arccos")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


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

    def __post_init__(self) -> None:
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


@MaskGITConfig.register_preset("maskgit-tiny")
def _maskgit_tiny() -> MaskGITConfig:
    """A CPU-sized generator for tests and demos."""
    return MaskGITConfig(
        num_tokens=32, codebook_size=256, num_classes=10, transformer=ViTConfig(width=64, depth=2, heads=4)
    )


def _maskgit_b(num_tokens: int) -> MaskGITConfig:
    # TiTok's generator: BERT-style, width 768, 24 layers, 16 heads, MLP 3072, 4096 codes, ImageNet classes.
    return MaskGITConfig(num_tokens=num_tokens, codebook_size=4096, num_classes=1000)


@MaskGITConfig.register_preset("maskgit-b")
def _maskgit_b32() -> MaskGITConfig:
    return _maskgit_b(32)


@MaskGITConfig.register_preset("maskgit-b-64")
def _maskgit_b64() -> MaskGITConfig:
    return _maskgit_b(64)


@MaskGITConfig.register_preset("maskgit-b-128")
def _maskgit_b128() -> MaskGITConfig:
    return _maskgit_b(128)


def mask_ratio(t: Tensor | float, schedule: str = "cosine") -> Tensor:
    """gamma(t): the fraction of tokens masked at progress ``t`` in [0, 1] (1 at t=0, 0 at t=1)."""
    t = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, Tensor) else None)
    if schedule == "cosine":
        return torch.cos(t * (math.pi / 2))
    if schedule == "arccos":
        return torch.acos(t.clamp(-1.0, 1.0)) / (math.pi / 2)
    raise ConfigError(f"mask_schedule {schedule!r} is unknown; use one of {', '.join(MASK_SCHEDULES)}")


def masked_counts(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens still masked after each sampling step: floor(N * gamma((s+1)/steps)), at least one fewer per step.

    The last entry is always 0. When ``steps > num_tokens`` the later steps have nothing left to unmask.
    """
    if steps < 1:
        raise TextokError(f"steps must be >= 1, got {steps}")
    counts: list[int] = []
    prev = num_tokens
    for s in range(steps):
        target = math.floor(num_tokens * float(mask_ratio((s + 1) / steps, schedule)))
        prev = max(0, min(target, prev - 1))
        counts.append(prev)
    counts[-1] = 0
    return counts


def _schedule_value(kind: str, start: float, end: float, t: float, allowed: tuple[str, ...], what: str) -> float:
    """Interpolate from ``start`` (t=0) to ``end`` (t=1): constant -> end, linear, or half-cosine ease."""
    if kind == "constant":
        return end
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return start + (end - start) * (1.0 - math.cos(math.pi * t)) / 2.0
    raise TextokError(f"{what} {kind!r} is unknown; use one of {', '.join(allowed)}")


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
        self.transformer = Transformer(cfg.transformer)
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
        steps: int = 8,
        *,
        temperature: float = 9.5,
        temperature_schedule: Literal["constant", "linear", "cosine"] = "linear",
        choice_temperature: float | None = None,
        guidance_scale: float = 1.0,
        guidance_schedule: Literal["constant", "linear", "cosine"] = "linear",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Iterative parallel decoding from a fully masked sequence -> codes (B, N) int64 in [0, K).

        Step s (progress t = (s+1)/steps) predicts every masked token: it takes the argmax of the guided logits
        plus Gumbel noise scaled by the step's temperature (sampling at that temperature; 0 = argmax), scores
        the pick by its **raw logit** plus Gumbel noise scaled by ``choice_temperature * (1 - t)``, and re-masks
        the least confident so that :func:`masked_counts` tokens remain masked. Already-decoded tokens are never
        re-masked. (A raw logit is not a log-probability: log-softmax subtracts a logsumexp that differs from
        position to position, so the two rank positions differently; TiTok's code ranks raw logits.)

        * ``temperature_schedule``: ``linear`` = temperature * (1 - t) (TiTok's annealing; the last step is
          greedy), ``constant`` (MaskGIT) or ``cosine`` = temperature * cos(pi/2 * t).
        * ``choice_temperature``: the confidence noise; ``None`` = the same as ``temperature`` (TiTok).
        * ``guidance_schedule`` (w = ``guidance_scale``, progress g = s/steps as in TiTok's code, so the
          first step is unguided for the increasing schedules): ``linear`` 1 + (w-1) g, ``constant`` w,
          ``cosine`` 1 + (w-1)(1 - cos(pi g))/2. Scale 1 is the plain conditional model.

        The defaults are TiTok's sampler (randomize_temperature 9.5, linear guidance); its guidance formula is
        cond + w (cond - uncond), so TiTok's w = 4.5 is ``guidance_scale=5.5`` here.
        """
        if choice_temperature is None:
            choice_temperature = temperature
        if temperature < 0 or choice_temperature < 0:
            raise TextokError(f"temperatures must be >= 0, got temperature={temperature} "
                              f"choice_temperature={choice_temperature}")
        if temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise TextokError(f"temperature_schedule {temperature_schedule!r} is unknown; "
                              f"use one of {', '.join(TEMPERATURE_SCHEDULES)}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise TextokError(f"guidance_schedule {guidance_schedule!r} is unknown; "
                              f"use one of {', '.join(GUIDANCE_SCHEDULES)}")
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
            scale = _schedule_value(guidance_schedule, 1.0, guidance_scale, s / steps, GUIDANCE_SCHEDULES,
                                    "guidance_schedule")
            logits = self.guided_logits(ids, labels, scale)
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
            conf = logits.gather(-1, sampled[..., None]).squeeze(-1)  # raw logits, as TiTok ranks them
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


__all__ = [
    "MaskGITConfig",
    "MaskGIT",
    "mask_ratio",
    "masked_counts",
    "MASK_SCHEDULES",
    "TEMPERATURE_SCHEDULES",
    "GUIDANCE_SCHEDULES",
]
