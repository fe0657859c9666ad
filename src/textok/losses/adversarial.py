"""GAN losses for tokenizer training: hinge / non-saturating, LeCAM, R1 and VQGAN's adaptive weight.

* ``d_loss(real, fake, kind)`` and ``g_loss(fake, kind)`` take raw logits (any shape, usually (B,)).
  Hinge: D = mean(relu(1 - real)) + mean(relu(1 + fake)), G = -mean(fake).
  Non-saturating: D = mean(softplus(-real)) + mean(softplus(fake)), G = mean(softplus(-fake)).
  (No 0.5 factor on the D loss; fold it into the weight if you want VQGAN's convention.)
* :class:`LeCAM` (Tseng et al. 2021, "Regularizing GANs under limited data"): EMAs of the mean real and
  fake logits, and the penalty mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2) added to the
  D loss. It keeps D's outputs on real and fake images from drifting apart, which stabilises training on
  small data sets. Its state is a pair of buffers, so it is saved/restored with ``state_dict``.
* :func:`adaptive_weight`: VQGAN's balancing of the generator loss against the reconstruction loss by
  the ratio of their gradient norms at the decoder's last layer.
* :func:`r1_penalty`: gradient penalty on real images (optional, StyleGAN's regulariser).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError

LOSS_KINDS = ("hinge", "non-saturating")


@dataclasses.dataclass
class AdversarialConfig(Config):
    """How the adversarial term enters tokenizer training."""

    kind: str = "hinge"  # "hinge" | "non-saturating"
    weight: float = 0.1  # generator-loss weight (multiplied by the adaptive weight when adaptive=True)
    start_step: int = 0  # the GAN terms are off before this step (reconstruction warm-up)
    start_fraction: float = 0.0  # > 0: off before this fraction of max_steps instead (ImageFolder: 0.28)
    lecam_weight: float = 0.001  # 0 disables LeCAM
    lecam_decay: float = 0.999
    adaptive: bool = False  # VQGAN: scale the GAN term by ||grad rec|| / ||grad gan|| at the decoder's last layer
    adaptive_max: float = 1e4  # clamp of that ratio
    r1_weight: float = 0.0  # gamma/2 of the R1 penalty on real images; 0 disables it
    r1_every: int = 16  # lazy R1 (StyleGAN2): every k discriminator steps, scaled by k
    diffaug: bool = False  # DiffAugment (losses/diffaug.py) on every image the discriminator sees (ImageFolder)
    diffaug_cutout: float = 0.2  # its cutout square's side, as a fraction of the image's

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"adversarial kind {self.kind!r} is not one of {', '.join(LOSS_KINDS)}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ConfigError(f"lecam_decay must be in [0, 1), got {self.lecam_decay}")
        if self.start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {self.start_step}")
        if not 0.0 <= self.start_fraction < 1.0:
            raise ConfigError(f"start_fraction must lie in [0, 1), got {self.start_fraction}")
        if self.start_fraction > 0 and self.start_step > 0:
            raise ConfigError(f"adversarial start_step={self.start_step} and start_fraction={self.start_fraction} both "
                              "say when the GAN starts; set one of them to 0")
        if self.r1_weight < 0 or self.r1_every < 1:
            raise ConfigError(f"r1_weight must be >= 0 and r1_every >= 1, got {self.r1_weight} and {self.r1_every}")
        if not 0.0 <= self.diffaug_cutout < 1.0:
            raise ConfigError(f"diffaug_cutout must lie in [0, 1), got {self.diffaug_cutout}")
        if self.adaptive_max <= 0:
            raise ConfigError(f"adaptive_max must be > 0, got {self.adaptive_max}")

    def start_at(self, max_steps: int) -> int:
        """The first step with the adversarial terms in a run of ``max_steps``."""
        return round(self.start_fraction * max_steps) if self.start_fraction > 0 else self.start_step

    def active(self, step: int, max_steps: int = 0) -> bool:
        """Whether the adversarial terms are switched on at ``step`` of a run of ``max_steps``."""
        return self.weight > 0 and step >= self.start_at(max_steps)

    def r1_at(self, d_step: int) -> bool:
        """Whether discriminator update number ``d_step`` adds the (lazy) R1 penalty."""
        return self.r1_weight > 0 and d_step % self.r1_every == 0


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ConfigError(f"adversarial loss kind {kind!r} is not one of {', '.join(LOSS_KINDS)}")


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Discriminator loss from raw logits on real and fake images (computed in float32)."""
    _check_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Generator (tokenizer) loss from the discriminator's logits on its outputs."""
    _check_kind(kind)
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser with its EMA anchors kept in buffers (resumable through ``state_dict``).

    ``init=None`` (default) starts each EMA at the first observed batch mean instead of at 0, so the
    anchors are meaningful from the first step even with decay 0.999; pass ``init=0.0`` for the reference
    implementation's zero start. Call ``update`` then ``penalty`` once per discriminator step (or
    ``forward``, which does both). Under data parallelism, pass logits gathered across ranks (or
    all-reduce the means) so every rank keeps the same anchors.
    """

    ema_real: Tensor
    ema_fake: Tensor
    num_updates: Tensor

    def __init__(self, decay: float = 0.999, init: float | None = None) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"LeCAM decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warm_start = init is None
        start = 0.0 if init is None else float(init)
        self.register_buffer("ema_real", torch.tensor(start, dtype=torch.float32))
        self.register_buffer("ema_fake", torch.tensor(start, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        """Move the EMAs toward this batch's mean real / fake logits (no host sync)."""
        real_mean = real_logits.detach().float().mean()
        fake_mean = fake_logits.detach().float().mean()
        decay = torch.full_like(self.ema_real, self.decay)
        if self.warm_start:  # first update copies the batch means
            decay = torch.where(self.num_updates == 0, torch.zeros_like(decay), decay)
        self.ema_real.copy_(self.ema_real * decay + real_mean * (1 - decay))
        self.ema_fake.copy_(self.ema_fake * decay + fake_mean * (1 - decay))
        self.num_updates.add_(1)

    def penalty(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2); gradients flow to the logits."""
        real, fake = real_logits.float(), fake_logits.float()
        return F.relu(real - self.ema_fake).square().mean() + F.relu(self.ema_real - fake).square().mean()

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        self.update(real_logits, fake_logits)
        return self.penalty(real_logits, fake_logits)

    def extra_repr(self) -> str:
        return f"decay={self.decay}, warm_start={self.warm_start}"


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """VQGAN's generator-loss weight: ||grad rec|| / (||grad g|| + eps) at the last layer, clamped, detached.

    Both losses must still have their graphs (the call keeps them: ``retain_graph=True``).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    w = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1: mean over the batch of ||d D(x) / d x||^2 on real images (``real_images`` must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()
