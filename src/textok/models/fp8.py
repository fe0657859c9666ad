"""FP8 (e4m3) matmuls for inference, behind a flag: :func:`use_fp8_linears` swaps a model's transformer-block
linears for :class:`FP8Linear`.

Why: a ViT-B tokenizer's forward is matmul-bound at ~45% of the bf16 peak, and cards with FP8 tensor cores
(compute capability 8.9 and up: Ada, Hopper) run e4m3 matmuls at twice the bf16 rate. Weights are quantized once
with one scale per output row; activations per token (one scale per row) at every call, so an outlier token
does not flatten the others. Inference only: the layers hold no trainable parameters. The patch embedding,
input projections and output heads stay in their own precision (small, and closest to the pixels/tokens).
On a CPU ``torch._scaled_mm`` also runs (slowly), which is what the CPU tests check against bf16/float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import TextokError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def fp8_supported(device: torch.device | str) -> bool:
    """True where FP8 matmuls are fast: a CUDA card of compute capability >= 8.9. (They also run on a CPU,
    emulated: correct, not fast.)"""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> e4m3 values and the (M, 1) float32 scales that restore them (x ~ q * scale)."""
    scale = x.detach().abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    # the clamp keeps a rounding overshoot of the largest entry from casting to NaN (e4m3fn has no infinity)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class FP8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose matmul runs in e4m3 with row-wise scales (bias added in the output dtype)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", q)  # (out, in)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xq, x_scale = _rowwise(x.reshape(-1, self.in_features))
        # CUDA's row-wise kernel writes bf16; the result is returned in the input's dtype
        out_dtype = torch.bfloat16 if x.is_cuda else (x.dtype if x.dtype in (torch.float32, torch.bfloat16)
                                                      else torch.float32)
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=out_dtype).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def use_fp8_linears(model: nn.Module, block_types: tuple[type, ...] | None = None) -> int:
    """Swap, in place, every ``nn.Linear`` inside the transformer blocks of ``model`` (by default textok's ViT,
    DiT and MaskGIT/VAR blocks: anything with ``attn`` and ``mlp`` children) for an :class:`FP8Linear`; returns
    how many were swapped. Dimensions must be multiples of 16 (the FP8 kernels' tile); others stay as they are.
    For inference: call it on a model in eval mode, after loading its weights."""
    if model.training:
        raise TextokError("FP8 linears are for inference: call model.eval() before use_fp8_linears(model)")

    def is_block(m: nn.Module) -> bool:
        if block_types is not None:
            return isinstance(m, block_types)
        return hasattr(m, "attn") and hasattr(m, "mlp")

    swapped = 0
    for block in [m for m in model.modules() if is_block(m)]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0):
                    setattr(parent, name, FP8Linear(child))
                    swapped += 1
    if swapped == 0:
        raise TextokError("use_fp8_linears found no linear layer to convert (no transformer block with widths that "
                          "are multiples of 16)")
    return swapped


__all__ = ["E4M3_MAX", "FP8Linear", "fp8_supported", "use_fp8_linears"]
