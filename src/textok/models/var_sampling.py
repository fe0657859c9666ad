"""How a VAR samples when not told otherwise (:class:`VARSamplerConfig`, stored with the model) and the top-k /
top-p draw of one code per position. :mod:`textok.models.var` holds the model that uses them."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError


@dataclasses.dataclass
class VARSamplerConfig(Config):
    """What `textok sample` samples a VAR with unless told otherwise (the paper's ImageFolder sampler; a converted
    release stores its own): guidance w (uncond + w (cond - uncond) at the last scale, ramped over the scales),
    top-k and top-p."""

    cfg: float = 4.25
    top_k: int = 750
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if not self.cfg >= 1 or self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"VAR sampler cfg={self.cfg} must be >= 1, top_k={self.top_k} >= 0 and "
                              f"top_p={self.top_p} in [0, 1]")


def sample_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """One id per row of logits (..., V): keep the top_k largest (0 = all), then the smallest set of mass >=
    top_p (0 or 1 = all; the most likely id always stays), sample at ``temperature`` (0 = argmax)."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V).float()
    if temperature == 0:
        return flat.argmax(-1).view(shape)
    flat = flat / temperature
    if 0 < top_k < V:
        kth = flat.topk(top_k, dim=-1).values[:, -1:]
        flat = flat.masked_fill(flat < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = flat.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this id already exceeds top_p
        flat = flat.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    ids = torch.multinomial(flat.softmax(-1), 1, generator=generator)
    return ids.view(shape)


__all__ = ["VARSamplerConfig", "sample_top_k_top_p"]
