"""VAR's attention: SDPA with a block-causal mask, a KV cache for scale-by-scale sampling, and attn_l2_norm
(l2-normalised queries and keys, a learned per-head temperature, softmax scale 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import Attention


class KVCache:
    """Keys and values of every position seen so far, per block (sampling only)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


MAX_LOG_SCALE = math.log(100.0)  # VAR's cap on the per-head attention temperature


class CachedAttention(Attention):
    """textok's SDPA attention with a mask, an optional KV cache and, with ``l2_norm``, VAR's attn_l2_norm:
    logits = exp(min(s_h, log 100)) cos(q, k), softmax scale 1, s_h learned per head from log 4."""

    def __init__(self, width: int, heads: int, qk_norm: bool = False, l2_norm: bool = False) -> None:
        super().__init__(width, heads, qk_norm)
        # (heads,): one dimension, so the optimizer leaves it out of weight decay (VAR's `scale_mul`)
        self.log_scale = nn.Parameter(torch.full((heads,), math.log(4.0))) if l2_norm else None

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scale = None
        if self.log_scale is not None:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp_max(MAX_LOG_SCALE).exp().to(q.dtype)[:, None, None]
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


__all__ = ["CachedAttention", "KVCache", "MAX_LOG_SCALE"]
