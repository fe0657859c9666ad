"""How a MaskGIT samples: the mask schedule (which share of tokens stays masked), the guidance schedule and the
sampler settings a MaskGIT stores with itself (:class:`MaskGITSamplerConfig`, TiTok's per-model settings).
:mod:`textok.models.maskgit` holds the model that uses them."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError, TextokError

MASK_SCHEDULES = ("cosine", "arccos")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine", "power-cosine")  # cosine = power-cosine, exponent 1


@dataclasses.dataclass
class MaskGITSamplerConfig(Config):
    """How this generator samples unless told otherwise (see :meth:`MaskGIT.generate`); stored with the model.

    The default is TiTok-L-32's FID sampler (1d-tokenizer's ``titok_l32.yaml`` with ``sample_imagenet_titok.py``)."""

    steps: int = 8
    temperature: float = 9.5  # Gumbel noise scale at the first step (TiTok's randomize_temperature)
    temperature_schedule: str = "linear"
    softmax_annealing: bool = True  # logits / (0.5 + 0.8 (1 - t)): TiTok's softmax_temperature_annealing
    guidance_scale: float = 5.5  # w in uncond + w (cond - uncond); TiTok's linear 4.5 is 5.5 here
    guidance_schedule: str = "linear"
    guidance_exponent: float = 1.0  # power-cosine's exponent p: 1 + (w - 1)(1 - cos(pi g^p)) / 2

    def __post_init__(self) -> None:
        try:
            check_sampler(self.steps, self.temperature, self.temperature_schedule, self.guidance_scale,
                          self.guidance_schedule, self.guidance_exponent)
        except TextokError as err:
            raise ConfigError(f"sampler: {err}") from None


def check_sampler(steps: int, temperature: float, temperature_schedule: str, guidance_scale: float,
                  guidance_schedule: str, guidance_exponent: float, choice_temperature: float | None = None) -> None:
    """Refuse sampler settings that cannot work, in one line each."""
    if steps < 1:
        raise TextokError(f"steps must be >= 1, got {steps}")
    if temperature < 0 or (choice_temperature is not None and choice_temperature < 0):
        raise TextokError(f"temperatures must be >= 0, got temperature={temperature} "
                          f"choice_temperature={choice_temperature}")
    if temperature_schedule not in TEMPERATURE_SCHEDULES:
        raise TextokError(f"temperature_schedule {temperature_schedule!r} is unknown; "
                          f"use one of {', '.join(TEMPERATURE_SCHEDULES)}")
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise TextokError(f"guidance_schedule {guidance_schedule!r} is unknown; "
                          f"use one of {', '.join(GUIDANCE_SCHEDULES)}")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
        raise TextokError(f"guidance_scale {guidance_scale} must be >= 1 (1 = no guidance)")
    if not guidance_exponent > 0:
        raise TextokError(f"guidance_exponent must be > 0, got {guidance_exponent}")
    if guidance_exponent != 1.0 and guidance_schedule not in ("cosine", "power-cosine"):
        raise TextokError(f"guidance_exponent {guidance_exponent} shapes the power-cosine guidance schedule only; "
                          f"set guidance_schedule=power-cosine or drop the exponent (schedule: {guidance_schedule})")


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


def guidance_at(schedule: str, scale: float, g: float, exponent: float = 1.0) -> float:
    """The guidance w at progress ``g`` in [0, 1): ``constant`` w; ``linear`` 1 + (w - 1) g; ``power-cosine``
    (and ``cosine``) 1 + (w - 1)(1 - cos(pi g^exponent)) / 2."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * g
    if schedule in ("cosine", "power-cosine"):
        return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * g**exponent)) / 2.0
    raise TextokError(f"guidance_schedule {schedule!r} is unknown; use one of {', '.join(GUIDANCE_SCHEDULES)}")


__all__ = ["MASK_SCHEDULES", "TEMPERATURE_SCHEDULES", "GUIDANCE_SCHEDULES", "MaskGITSamplerConfig", "check_sampler",
           "mask_ratio", "masked_counts", "guidance_at"]
