"""The transformer block of VAR (:mod:`textok.models.var`): adaLN-modulated attention + MLP with stochastic
depth, its attention (SDPA with a mask, a KV cache for sampling and VAR's l2-normalised attention with a
learned per-head temperature) and the cache itself."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import modulate
from .vit import MLP, Attention, drop_path


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


class VARBlock(nn.Module):
    """adaLN block: x + g1 * attn(mod(LN(x))); x + g2 * mlp(mod(LN(x))), shift/scale/gate from SiLU(c); in
    training each residual branch is dropped per sample with probability ``drop_path``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, attn_l2_norm: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CachedAttention(width, heads, qk_norm, attn_l2_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.ada = nn.Linear(width, 6 * width)
        self.drop_path = drop_path

    def forward(self, x: Tensor, c_act: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c_act).chunk(6, dim=-1)
        rate = self.drop_path if self.training else 0.0
        x = x + drop_path(gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask, cache), rate,
                          generator)
        return x + drop_path(gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2)), rate, generator)


__all__ = ["KVCache", "CachedAttention", "VARBlock", "MAX_LOG_SCALE"]
