"""Token bottlenecks shared by the tokenizers: a vector quantiser and a diagonal-Gaussian (KL) bottleneck.

* :class:`VectorQuantizer` — TiTok's VQ: a codebook of ``num_codes`` vectors of ``code_dim`` (4096 x 12,
  l2-normalised, in TiTok). Nearest code by one matmul, straight-through gradients, commitment
  (``beta * ||z - sg(q)||^2``) and codebook (``||sg(z) - q||^2``) losses, usage metrics, and optional
  dead-code restart. With ``l2_normalized`` both the inputs and the codes are projected onto the unit
  sphere before matching (cosine similarity), which keeps codebook usage high.
* :class:`DiagonalGaussian` — the KL bottleneck (VAE variant): (B, N, 2d) -> mean, log-variance ->
  sample (training) or mean (eval), KL(q || N(0, I)).

Both work on (B, N, C) token sequences and know nothing of the tokenizer around them, so ImageFolder's
product and residual quantisers can stack them. All the state a VQ needs to resume exactly (the codebook
and the per-code "steps since used" counters) lives in its parameters and buffers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError, TextokError

QUANTIZER_KINDS = ("vq", "kl", "none")


@dataclasses.dataclass
class QuantizerConfig(Config):
    """Which bottleneck sits between encoder and decoder, and its options."""

    kind: str = "vq"  # "vq" | "kl" | "none"
    num_codes: int = 4096
    code_dim: int = 12  # for "kl": the latent channels d (the encoder emits 2d)
    l2_normalized: bool = True
    beta: float = 0.25  # commitment cost
    dead_code_steps: int = 0  # restart codes unused for this many training steps; 0 = off
    kl_weight: float = 1e-6  # weight a trainer puts on the KL term (kind="kl")

    def __post_init__(self) -> None:
        if self.kind not in QUANTIZER_KINDS:
            raise ConfigError(f"quantizer kind {self.kind!r} is not one of {', '.join(QUANTIZER_KINDS)}")
        if self.num_codes < 1 or self.code_dim < 1:
            raise ConfigError(f"num_codes and code_dim must be >= 1, got {self.num_codes}, {self.code_dim}")
        if self.dead_code_steps < 0:
            raise ConfigError(f"dead_code_steps must be >= 0, got {self.dead_code_steps}")


@QuantizerConfig.register_preset("titok-vq")
def _titok_vq() -> QuantizerConfig:
    return QuantizerConfig(kind="vq", num_codes=4096, code_dim=12, l2_normalized=True, beta=0.25)


@QuantizerConfig.register_preset("kl-8")
def _kl_8() -> QuantizerConfig:
    return QuantizerConfig(kind="kl", code_dim=8)


@QuantizerConfig.register_preset("tiny-vq")
def _tiny_vq() -> QuantizerConfig:
    return QuantizerConfig(kind="vq", num_codes=64, code_dim=8, l2_normalized=True, dead_code_steps=50)


def _data_parallel() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclasses.dataclass
class VQOutput:
    """What :meth:`VectorQuantizer.forward` returns."""

    quantized: Tensor  # (B, N, D), straight-through: forward value = codes, gradient = identity to input
    codes: Tensor  # (B, N) int64
    losses: dict[str, Tensor]  # "commitment" (already times beta), "codebook", "loss" (their sum)
    metrics: dict[str, Tensor]  # "usage" (fraction of codes used in the batch), "perplexity"


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with straight-through gradients.

    Input (B, N, code_dim) -> :class:`VQOutput`. Distances go through a single matmul in float32 (also
    under autocast). The codebook is ``self.embedding.weight`` (TiTok's key name); with ``l2_normalized``
    it is normalised at use, so only directions matter.

    Dead-code restart (``dead_code_steps`` > 0): a buffer counts, per code, the training forward passes
    since the code was last chosen. At the start of each training forward, codes unused for at least
    ``dead_code_steps`` passes are overwritten by encoder outputs of the current batch drawn with
    ``torch.randint`` (deterministic given torch's RNG), and their counters reset. Call
    :meth:`restart_dead_codes` yourself to do it at other times. Under data parallelism (an initialised
    process group) the usage counts are summed over the ranks, so every rank sees the same dead codes, and
    the replacement vectors are rank 0's, broadcast, so the codebooks stay identical. The optimizer's moments
    for a restarted code are not reset.
    """

    unused_steps: Tensor

    def __init__(
        self,
        num_codes: int = 4096,
        code_dim: int = 12,
        l2_normalized: bool = True,
        beta: float = 0.25,
        dead_code_steps: int = 0,
    ) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ConfigError(f"num_codes and code_dim must be >= 1, got {num_codes}, {code_dim}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.l2_normalized = l2_normalized
        self.beta = beta
        self.dead_code_steps = dead_code_steps
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)  # VQGAN / TiTok init
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg: QuantizerConfig) -> "VectorQuantizer":
        return cls(cfg.num_codes, cfg.code_dim, cfg.l2_normalized, cfg.beta, cfg.dead_code_steps)

    def codebook(self) -> Tensor:
        """The (num_codes, code_dim) code vectors as used for matching and decoding."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalized else w

    def _check_input(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[-1] != self.code_dim:
            raise TextokError(
                f"vector quantizer expects (..., {self.code_dim}) latents, got shape {tuple(z.shape)}; "
                f"set code_dim to the encoder's output width"
            )

    def forward(self, z: Tensor) -> VQOutput:
        self._check_input(z)
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.l2_normalized:
                z = F.normalize(z, dim=-1)
            flat = z.reshape(-1, self.code_dim)
            if self.training and self.dead_code_steps > 0:
                self.restart_dead_codes(flat)
            codebook = self.codebook().float()
            codes = self._nearest(flat, codebook)
            q = codebook[codes].view_as(z)
            commitment = self.beta * F.mse_loss(z, q.detach())
            codebook_loss = F.mse_loss(q, z.detach())
            quantized = z + (q - z).detach()  # straight-through estimator
            counts = torch.bincount(codes, minlength=self.num_codes)
            if self.training and _data_parallel():
                dist.all_reduce(counts)  # usage over the global batch: the same dead codes on every rank
            if self.training:
                self._track_usage(counts)
            probs = counts.float() / counts.sum().clamp_min(1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
            metrics = {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}
        losses = {"commitment": commitment, "codebook": codebook_loss, "loss": commitment + codebook_loss}
        return VQOutput(quantized.to(in_dtype), codes.view(z.shape[:-1]), losses, metrics)

    @staticmethod
    def _nearest(flat: Tensor, codebook: Tensor) -> Tensor:
        """argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k), one (M, K) matmul."""
        scores = codebook.square().sum(1)[None, :] - 2.0 * (flat @ codebook.t())
        return scores.argmin(dim=1)

    @torch.no_grad()
    def _track_usage(self, counts: Tensor) -> None:
        self.unused_steps.add_(1)
        self.unused_steps.masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def quantize_codes(self, z: Tensor) -> Tensor:
        """Codes only (B, N) for (B, N, code_dim) latents: no losses, no state change."""
        self._check_input(z)
        flat = z.float().reshape(-1, self.code_dim)
        if self.l2_normalized:
            flat = F.normalize(flat, dim=-1)
        return self._nearest(flat, self.codebook().float()).view(z.shape[:-1])

    @torch.no_grad()
    def restart_dead_codes(self, latents: Tensor, min_unused_steps: int | None = None) -> int:
        """Reset codes unused for ``min_unused_steps`` (default ``dead_code_steps``) updates to random rows
        of ``latents`` (any shape ending in code_dim). Returns how many codes were restarted."""
        threshold = self.dead_code_steps if min_unused_steps is None else min_unused_steps
        if threshold <= 0:
            return 0
        flat = latents.detach().reshape(-1, self.code_dim).float()
        parallel = _data_parallel()
        if flat.shape[0] == 0 and not parallel:
            return 0
        dead = (self.unused_steps >= threshold).nonzero().squeeze(1)  # the same on every rank (summed usage)
        n = int(dead.numel())
        if n == 0:
            return 0
        if flat.shape[0]:
            idx = torch.randint(flat.shape[0], (n,), device=flat.device)  # every rank draws: RNG stays in step
            new = flat[idx]
            if self.l2_normalized:
                new = F.normalize(new, dim=-1)
        else:  # this rank's whole batch was undecodable: it takes rank 0's vectors below
            new = self.embedding.weight[dead].float()
        new = new.to(self.embedding.weight.dtype).contiguous()
        if parallel:
            dist.broadcast(new, src=0)  # rank 0's replacements everywhere: identical codebooks
        self.embedding.weight[dead] = new
        self.unused_steps[dead] = 0
        return n

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Integer ids (any shape) -> code vectors (..., code_dim); ids outside the codebook are an error."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TextokError(f"code ids must be an integer tensor, got {codes.dtype}")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.num_codes:
                raise TextokError(
                    f"code ids must be in [0, {self.num_codes - 1}] for this {self.num_codes}-code codebook, "
                    f"got values in [{lo}, {hi}]; were the codes made with another quantizer?"
                )
        return F.embedding(codes.long(), self.codebook())

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, l2_normalized={self.l2_normalized}, "
            f"beta={self.beta}, dead_code_steps={self.dead_code_steps}"
        )


@dataclasses.dataclass
class GaussianOutput:
    """What :meth:`DiagonalGaussian.forward` returns."""

    latents: Tensor  # (B, N, d): a sample in training (or sample=True), the mean otherwise
    mean: Tensor
    logvar: Tensor
    losses: dict[str, Tensor]  # "kl": KL(q || N(0, I)) summed over (N, d), averaged over the batch


class DiagonalGaussian(nn.Module):
    """KL bottleneck: the encoder emits (B, N, 2d) = [mean, log-variance]; log-variance clamped to [-30, 20].

    The KL follows the LDM/TiTok-VAE convention: 0.5 * sum(mean^2 + var - 1 - logvar) over every
    non-batch dimension, then the batch mean; trainers weight it by a small factor (``kl_weight``).
    """

    def __init__(self, latent_dim: int = 8) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, params: Tensor, sample: bool | None = None) -> GaussianOutput:
        if params.shape[-1] != 2 * self.latent_dim:
            raise TextokError(
                f"Gaussian bottleneck expects (..., {2 * self.latent_dim}) = [mean, logvar] of d={self.latent_dim}, "
                f"got shape {tuple(params.shape)}"
            )
        mean, logvar = params.float().chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)
        do_sample = self.training if sample is None else sample
        if do_sample:
            latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        else:
            latents = mean
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        kl = kl.reshape(kl.shape[0], -1).sum(1).mean()
        return GaussianOutput(latents.to(params.dtype), mean, logvar, {"kl": kl})

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


def build_quantizer(cfg: QuantizerConfig) -> nn.Module:
    """The bottleneck module a :class:`QuantizerConfig` describes (``nn.Identity`` for kind="none")."""
    if cfg.kind == "vq":
        return VectorQuantizer.from_config(cfg)
    if cfg.kind == "kl":
        return DiagonalGaussian(cfg.code_dim)
    return nn.Identity()
